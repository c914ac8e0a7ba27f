"""Demo function tools: a fake weather service and a unit converter, run locally.

`ossgpt chat --tools demo` declares `DEMO_TOOLS` and answers the model's calls with `run_tool`;
the synthetic training data of the nano model (`ossgpt.data`) uses exactly the same definitions
and outputs, so the model sees at chat time what it saw in training: `sample_exchange` makes
those training conversations (question, call, real result, answer). Everything is deterministic
(a fixed weather table, no network) and `run_tool` never raises: a bad call gets a JSON error
object back, which the model has learned to report.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

# Fixed weather table: city -> (temperature in celsius, condition). ~40 well-known cities.
WEATHER: dict[str, tuple[int, str]] = {
    "Paris": (18, "cloudy"), "London": (14, "rainy"), "Berlin": (16, "sunny"),
    "Madrid": (27, "sunny"), "Rome": (24, "sunny"), "Lisbon": (21, "windy"),
    "Amsterdam": (13, "rainy"), "Brussels": (15, "cloudy"), "Vienna": (19, "partly cloudy"),
    "Prague": (12, "foggy"), "Warsaw": (9, "cloudy"), "Stockholm": (6, "snowy"),
    "Oslo": (3, "snowy"), "Copenhagen": (11, "windy"), "Helsinki": (-2, "snowy"),
    "Dublin": (10, "rainy"), "Athens": (29, "sunny"), "Istanbul": (22, "partly cloudy"),
    "Moscow": (-5, "snowy"), "Cairo": (33, "sunny"), "Nairobi": (23, "partly cloudy"),
    "Lagos": (31, "stormy"), "Cape Town": (17, "windy"), "Tokyo": (20, "rainy"),
    "Seoul": (15, "sunny"), "Beijing": (8, "foggy"), "Shanghai": (19, "cloudy"),
    "Singapore": (30, "stormy"), "Bangkok": (34, "sunny"), "Mumbai": (32, "rainy"),
    "Delhi": (36, "sunny"), "Dubai": (38, "sunny"), "Sydney": (22, "sunny"),
    "Auckland": (16, "windy"), "New York": (12, "cloudy"), "Los Angeles": (25, "sunny"),
    "Chicago": (4, "windy"), "Toronto": (1, "snowy"), "Mexico City": (21, "partly cloudy"),
    "Lima": (19, "foggy"), "Buenos Aires": (17, "rainy"), "Rio de Janeiro": (28, "sunny"),
}
_CITY_KEYS = {c.lower(): c for c in WEATHER}

# Canonical unit names (what the schema allows) and the spellings run_tool also accepts.
UNITS = ("km", "miles", "kg", "pounds", "celsius", "fahrenheit", "meters", "feet")
_ALIASES = {
    "km": "km", "kilometer": "km", "kilometers": "km", "kilometre": "km", "kilometres": "km",
    "mile": "miles", "miles": "miles", "mi": "miles",
    "kg": "kg", "kilogram": "kg", "kilograms": "kg", "kilo": "kg", "kilos": "kg",
    "pound": "pounds", "pounds": "pounds", "lb": "pounds", "lbs": "pounds",
    "celsius": "celsius", "c": "celsius", "°c": "celsius", "degrees celsius": "celsius",
    "fahrenheit": "fahrenheit", "f": "fahrenheit", "°f": "fahrenheit",
    "degrees fahrenheit": "fahrenheit",
    "meter": "meters", "meters": "meters", "metre": "meters", "metres": "meters", "m": "meters",
    "foot": "feet", "feet": "feet", "ft": "feet",
}
# Linear conversions (multiply); temperatures are affine and handled apart.
_FACTORS = {
    ("km", "miles"): 1 / 1.609344, ("miles", "km"): 1.609344,
    ("kg", "pounds"): 1 / 0.45359237, ("pounds", "kg"): 0.45359237,
    ("meters", "feet"): 1 / 0.3048, ("feet", "meters"): 0.3048,
}
_TEMPERATURE = {("celsius", "fahrenheit"): lambda c: c * 9 / 5 + 32,
                ("fahrenheit", "celsius"): lambda f: (f - 32) * 5 / 9}

DEMO_TOOLS: list[dict] = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name, e.g. Paris"}},
            "required": ["city"],
        },
    }},
    {"type": "function", "function": {
        "name": "convert_units",
        "description": "Convert a value between units of length, mass or temperature.",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "number", "description": "The value to convert"},
                "from_unit": {"type": "string", "enum": list(UNITS)},
                "to_unit": {"type": "string", "enum": list(UNITS)},
            },
            "required": ["value", "from_unit", "to_unit"],
        },
    }},
]


def format_number(x: float) -> str:
    """A number as the tools and the training data write it: integral values without ".0",
    others rounded to 2 decimals ("6.21"), so the model only ever copies short numbers."""
    x = round(float(x), 2)
    if x == int(x):
        return str(int(x))
    return f"{x:.2f}".rstrip("0")


def _number(x: float) -> int | float:
    """`format_number` as a JSON value (int when integral, so it prints as 68 not 68.0)."""
    x = round(float(x), 2)
    return int(x) if x == int(x) else x


def weather(city: str) -> dict:
    """The fixed weather report of `city` (case-insensitive; "Paris, France" works), or an error."""
    key = city.split(",")[0].strip().lower() if isinstance(city, str) else ""
    if key not in _CITY_KEYS:
        return {"error": f"unknown city: {city}"}
    name = _CITY_KEYS[key]
    temp, condition = WEATHER[name]
    return {"city": name, "temperature_c": temp, "condition": condition}


def convert(value: Any, from_unit: Any, to_unit: Any) -> dict:
    """Convert `value` between two supported units, or return an error object."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return {"error": f"value must be a number, not {value!r}"}
    try:
        v = float(value)
    except ValueError:
        return {"error": f"value must be a number, not {value!r}"}
    if not math.isfinite(v) or abs(v) > 1e12:  # keep results short numbers, never inf
        return {"error": f"value out of range: {value!r}"}
    units = []
    for u in (from_unit, to_unit):
        canon = _ALIASES.get(u.strip().lower()) if isinstance(u, str) else None
        if canon is None:
            return {"error": f"unknown unit: {u}"}
        units.append(canon)
    src, dst = units
    if src == dst:
        result = v
    elif (src, dst) in _FACTORS:
        result = v * _FACTORS[src, dst]
    elif (src, dst) in _TEMPERATURE:
        result = _TEMPERATURE[src, dst](v)
    else:
        return {"error": f"cannot convert {src} to {dst}"}
    return {"value": _number(v), "from_unit": src, "to_unit": dst, "result": _number(result)}


def run_tool(name: str, arguments: str) -> str:
    """Run a demo tool called as the model calls it (name, JSON arguments text); return the
    result as JSON text. Never raises: unknown tools, bad JSON, missing arguments, unknown cities
    and units all give {"error": "..."}."""
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
    except (ValueError, TypeError):
        return json.dumps({"error": "arguments are not valid JSON"})
    if not isinstance(args, dict):
        return json.dumps({"error": "arguments must be a JSON object"})
    try:
        if name == "get_weather":
            if "city" not in args:
                return json.dumps({"error": "missing argument: city"})
            out = weather(args["city"])
        elif name == "convert_units":
            missing = [k for k in ("value", "from_unit", "to_unit") if k not in args]
            if missing:
                return json.dumps({"error": "missing argument: " + ", ".join(missing)})
            out = convert(args["value"], args["from_unit"], args["to_unit"])
        else:
            out = {"error": f"unknown tool: {name}"}
    except Exception as e:  # a tool must never crash the chat loop; report instead
        out = {"error": f"{type(e).__name__}: {e}"}
    return json.dumps(out, ensure_ascii=False)


def tool_exchange(question: str, reasoning: str, name: str, args: dict) -> tuple[list[dict], dict]:
    """A worked exchange with a demo tool, as the nano model is trained on it: the user's
    question, the assistant's reasoning and call, `run_tool`'s real result, then the assistant's
    reasoning and an answer that restates the result (or the error). Returns the OpenAI-style
    messages and what an evaluator expects: the call, and what the answer should mention."""
    arguments = json.dumps(args, ensure_ascii=False)
    result = run_tool(name, arguments)
    r = json.loads(result)
    if "error" in r:
        after = ("The tool returned an error. I will tell the user.",
                 f"Sorry, I couldn't get that: {r['error']}.", ["sorry"])
    elif name == "get_weather":
        c, t, cond = r["city"], r["temperature_c"], r["condition"]
        after = (f"The tool says {c} is {cond} at {t}°C.",
                 f"The weather in {c} is {cond}, {t}°C.", [cond, str(t)])
    else:
        v, f, t, res = (format_number(r["value"]), r["from_unit"], r["to_unit"],
                        format_number(r["result"]))
        after = (f"The tool says {v} {f} is {res} {t}.", f"{v} {f} is {res} {t}.", [res])
    call = {"id": "call_0", "type": "function",
            "function": {"name": name, "arguments": arguments}}
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "reasoning": reasoning, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_0", "name": name, "content": result},
                {"role": "assistant", "reasoning": after[0], "content": after[1]}]
    return messages, {"tool": name, "arguments": args, "final_contains": after[2]}


# -- training conversations ----------------------------------------------------------------------
UNKNOWN_PLACES = ("Atlantis", "Narnia", "Gotham", "El Dorado", "Wakanda", "Avalon", "Lilliput",
                  "Shangri-La")
_WEATHER_Q = ("What's the weather in {c}?|How is the weather in {c} right now?|"
              "Tell me the weather for {c}.|weather {c}|What's the temperature in {c}?|"
              "Is it cold in {c} today?|What is the weather like in {c}?|"
              "Can you check the weather in {c}?").split("|")
# Surface names in questions; arguments always use the canonical enum value.
_UNIT_WORDS = {"km": ("km", "kilometers"), "miles": ("miles",), "kg": ("kg", "kilograms"),
               "pounds": ("pounds", "lbs"), "celsius": ("celsius", "degrees Celsius"),
               "fahrenheit": ("fahrenheit", "degrees Fahrenheit"), "meters": ("meters",),
               "feet": ("feet",)}
_CONV_Q = ("Convert {v} {f} to {t}.|How many {t} is {v} {f}?|What is {v} {f} in {t}?|"
           "{v} {f} to {t}?|Please convert {v} {f} into {t}.").split("|")
_PAIRS = (("km", "miles"), ("miles", "km"), ("kg", "pounds"), ("pounds", "kg"),
          ("celsius", "fahrenheit"), ("fahrenheit", "celsius"), ("meters", "feet"),
          ("feet", "meters"))


def sample_exchange(rng: random.Random) -> tuple[tuple, list[dict], dict]:
    """A random weather (55%) or conversion question worked through `tool_exchange`. Returns a
    key naming the item (for train/test splits), the messages and the expectations."""
    if rng.random() < 0.55:  # unknown places too: the model must relay the tool's error
        city = rng.choice(UNKNOWN_PLACES) if rng.random() < 0.12 else rng.choice(list(WEATHER))
        t = rng.randrange(len(_WEATHER_Q))
        msgs, exp = tool_exchange(
            _WEATHER_Q[t].format(c=city),
            f"The user asks about the weather in {city}. I will call get_weather with city {city}.",
            "get_weather", {"city": city})
        return ("weather", city, t), msgs, exp
    src, dst = rng.choice(_PAIRS)
    temperature = src in ("celsius", "fahrenheit")
    value: float = rng.randint(-40, 120) if temperature else rng.randint(1, 500)
    if rng.random() < 0.2:
        value += 0.5
    v = format_number(value)
    q = rng.choice(_CONV_Q).format(v=v, f=rng.choice(_UNIT_WORDS[src]),
                                   t=rng.choice(_UNIT_WORDS[dst]))
    msgs, exp = tool_exchange(
        q, f"The user wants {v} {src} in {dst}. I will call convert_units with value {v}, "
           f"from_unit {src}, to_unit {dst}.",
        "convert_units", {"value": value, "from_unit": src, "to_unit": dst})
    return ("convert", value, src, dst), msgs, exp
