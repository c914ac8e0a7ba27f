// Runs a tool-calling agent of the OpenAI Agents SDK for JavaScript against `ossgpt serve`,
// through the SDK's Chat Completions model and its Responses model, each non-streamed and
// streamed. Usage: node agent_weather.mjs BASE_URL [MODEL]   (BASE_URL without /v1)
//
// Prints one JSON line per variant:
//   {variant, ok, toolCalls, finalOutput, requests, warnings, error}
// and exits 1 if any variant failed. A variant fails if the run throws, the get_weather tool did
// not run with city Paris, the final output is empty, any HTTP request got a non-2xx status, or
// the SDK logged an error or warning (how it reports a response it could not make sense of).

import {
  Agent,
  OpenAIChatCompletionsModel,
  OpenAIResponsesModel,
  run,
  setDefaultOpenAIClient,
  setTracingDisabled,
  tool,
} from '@openai/agents';
import OpenAI from 'openai';
import { z } from 'zod';

const baseURL = process.argv[2];
const modelName = process.argv[3] ?? 'nano';
if (!baseURL) {
  console.error('usage: node agent_weather.mjs BASE_URL [MODEL]');
  process.exit(2);
}

setTracingDisabled(true); // no network beyond the server

// Everything the SDK logs (it logs through console.warn / console.error) and every HTTP
// exchange, attributed to the variant that is running.
let current = null;
for (const level of ['warn', 'error']) {
  const original = console[level].bind(console);
  console[level] = (...args) => {
    if (current) {
      current.warnings.push(`${level}: ${args.map(formatArg).join(' ')}`);
    }
    original(...args);
  };
}

function formatArg(a) {
  if (a instanceof Error) return `${a.name}: ${a.message}`;
  if (typeof a === 'string') return a;
  try {
    return JSON.stringify(a);
  } catch {
    return String(a);
  }
}

async function recordingFetch(url, init) {
  const response = await fetch(url, init);
  if (current) {
    current.requests.push({
      method: init?.method ?? 'GET',
      path: new URL(String(url)).pathname,
      status: response.status,
    });
  }
  return response;
}

const client = new OpenAI({
  baseURL: baseURL.replace(/\/+$/, '') + '/v1',
  apiKey: 'sk-unused',
  maxRetries: 0, // a failed request must show, not be retried away
  timeout: 300_000,
  fetch: recordingFetch,
});
setDefaultOpenAIClient(client);

// Written as Python's json.dumps writes it (", " and ": "), as in nano's training data.
const WEATHER_PARIS = '{"city": "Paris", "temperature_c": 18, "condition": "sunny"}';

// nano was trained with exactly the two demo tools of ossgpt/demo_tools.py (DEMO_TOOLS), in that
// order, and only behaves with that declaration; so the agent declares convert_units too.
const UNITS = ['km', 'miles', 'kg', 'pounds', 'celsius', 'fahrenheit', 'meters', 'feet'];

function makeAgent(model, calls) {
  const getWeather = tool({
    name: 'get_weather',
    description: 'Get the current weather in a city.',
    parameters: z.object({
      city: z.string().describe('The city name, e.g. Paris'),
    }),
    execute: async ({ city }) => {
      calls.push({ tool: 'get_weather', city });
      return WEATHER_PARIS;
    },
  });
  const convertUnits = tool({
    name: 'convert_units',
    description: 'Convert a value between units of length, mass or temperature.',
    parameters: z.object({
      value: z.number().describe('The value to convert'),
      from_unit: z.enum(UNITS),
      to_unit: z.enum(UNITS),
    }),
    execute: async (args) => {
      calls.push({ tool: 'convert_units', ...args });
      return JSON.stringify({ error: 'not available in this test' });
    },
  });
  return new Agent({
    name: 'Weather assistant',
    instructions: 'You are a helpful assistant. Use the tools to answer questions.',
    model,
    modelSettings: { temperature: 0 },
    tools: [getWeather, convertUnits],
  });
}

const variants = [
  { name: 'chat_completions', api: 'chat', stream: false },
  { name: 'chat_completions_stream', api: 'chat', stream: true },
  { name: 'responses', api: 'responses', stream: false },
  { name: 'responses_stream', api: 'responses', stream: true },
];

let failed = 0;
for (const v of variants) {
  const calls = [];
  const record = { variant: v.name, ok: false, toolCalls: calls, finalOutput: null,
                   requests: [], warnings: [], error: null };
  current = record;
  try {
    const model = v.api === 'chat'
      ? new OpenAIChatCompletionsModel(client, modelName)
      : new OpenAIResponsesModel(client, modelName);
    const agent = makeAgent(model, calls);
    const input = "What's the weather in Paris?";
    let result;
    if (v.stream) {
      result = await run(agent, input, { stream: true, maxTurns: 5 });
      let events = 0;
      for await (const _event of result) events += 1;
      await result.completed;
      if (result.error) throw result.error;
      if (events === 0) throw new Error('the streamed run produced no events');
    } else {
      result = await run(agent, input, { maxTurns: 5 });
    }
    record.finalOutput = result.finalOutput ?? null;
    const problems = [];
    if (!calls.some((c) => c.tool === 'get_weather' && c.city === 'Paris')) {
      problems.push(`get_weather never ran with city Paris (calls: ${JSON.stringify(calls)})`);
    }
    if (typeof record.finalOutput !== 'string' || record.finalOutput.trim() === '') {
      problems.push(`empty final output: ${JSON.stringify(record.finalOutput)}`);
    }
    const bad = record.requests.filter((r) => r.status < 200 || r.status >= 300);
    if (bad.length) problems.push(`non-2xx responses: ${JSON.stringify(bad)}`);
    if (record.warnings.length) problems.push(`the SDK logged: ${record.warnings.join(' | ')}`);
    if (problems.length) record.error = problems.join('; ');
    else record.ok = true;
  } catch (e) {
    record.error = e instanceof Error ? `${e.name}: ${e.message}\n${e.stack ?? ''}` : String(e);
  } finally {
    current = null;
  }
  if (!record.ok) failed += 1;
  process.stdout.write(JSON.stringify(record) + '\n');
}
process.exit(failed ? 1 : 0);
