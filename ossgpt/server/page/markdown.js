"use strict";
// A small markdown renderer for the chat page, written here rather than vendored: the usual
// libraries (marked, markdown-it) build an HTML string, and since markdown allows raw HTML that
// string must go through a sanitizer (DOMPurify) too. This one builds DOM nodes instead, and the
// model's text only ever becomes text nodes, so nothing a model writes can turn into markup or
// script (a `<script>` in a reply shows as those characters). It covers what chat models write:
// headings, paragraphs, lists (nested), block quotes, fenced code, tables, rules, inline code,
// bold, italic, strikethrough and http(s) links. An unclosed fence runs to the end, so code
// renders as code while it streams in.

(function () {
  const FENCE = /^\s*(`{3,}|~{3,})\s*([^\s`]*)/;
  const HEADING = /^(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s*>/;
  const LIST = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  // code | ***both*** | **bold** | __bold__ | *italic* | _italic_ | ~~struck~~ | [label](url) |
  // bare url
  const INLINE = new RegExp([
    /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,
    /\*\*\*(?=\S)([\s\S]*?\S)\*\*\*/.source,
    /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,
    /(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source,
    /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source,
    /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source,
    /~~(?=\S)([\s\S]*?\S)~~/.source,
    /\[([^\]\n]+)\]\(\s*<?([^\s<>()]+)>?\s*\)/.source,
    /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"*_])/.source,
  ].join("|"));

  function el(tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function startsBlock(lines, i) {
    const line = lines[i];
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      LIST.test(line) || isTable(lines, i);
  }

  function isTable(lines, i) {
    return lines[i].includes("|") && i + 1 < lines.length && lines[i + 1].includes("-") &&
      TABLE_RULE.test(lines[i + 1]);
  }

  function cells(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|")) s = s.slice(0, -1);
    return s.split("|").map((c) => c.trim());
  }

  function indentOf(line) {
    return line.length - line.trimStart().length;
  }

  function render(text) {
    const root = document.createDocumentFragment();
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = FENCE.exec(line))) {
        const code = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) code.push(lines[i]);
        i++;
        root.append(codeBlock(code.join("\n"), m[2]));
      } else if ((m = HEADING.exec(line))) {
        root.append(inline(el("h" + m[1].length), m[2]));
        i++;
      } else if (RULE.test(line)) {
        root.append(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const inner = [];
        for (; i < lines.length && QUOTE.test(lines[i]); i++) inner.push(lines[i].replace(/^\s*> ?/, ""));
        const quote = el("blockquote");
        quote.append(render(inner.join("\n")));
        root.append(quote);
      } else if (isTable(lines, i)) {
        i = table(lines, i, root);
      } else if (LIST.test(line)) {
        i = list(lines, i, root);
      } else {
        const p = el("p");
        for (let first = true; i < lines.length && lines[i].trim() && (first || !startsBlock(lines, i)); i++) {
          if (!first) p.append(el("br"));
          inline(p, lines[i].trim());
          first = false;
        }
        root.append(p);
      }
    }
    return root;
  }

  function list(lines, i, root) {
    const first = LIST.exec(lines[i]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const node = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    while (i < lines.length) {
      const m = LIST.exec(lines[i]);
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
      const column = indent + m[2].length + 1;
      const body = [m[3]];
      for (i++; i < lines.length; i++) {
        const line = lines[i];
        if (line.trim() && indentOf(line) > indent) {
          body.push(line.slice(Math.min(indentOf(line), column)));
        } else if (!line.trim() && i + 1 < lines.length && lines[i + 1].trim() &&
                   indentOf(lines[i + 1]) > indent) {
          body.push("");
        } else {
          break;
        }
      }
      const item = el("li");
      if (body.length === 1) inline(item, body[0]);
      else item.append(render(body.join("\n")));
      node.append(item);
      // A blank line between items keeps the list going.
      if (i + 1 < lines.length && !lines[i]?.trim() && LIST.test(lines[i + 1])) i++;
    }
    root.append(node);
    return i;
  }

  function table(lines, i, root) {
    const align = cells(lines[i + 1]).map((c) =>
      c.endsWith(":") ? (c.startsWith(":") ? "center" : "right") : "");
    const node = el("table");
    const row = (line, tag) => {
      const tr = el("tr");
      cells(line).forEach((c, k) => {
        const cell = inline(el(tag), c);
        if (align[k]) cell.style.textAlign = align[k];
        tr.append(cell);
      });
      return tr;
    };
    node.append(el("thead"), el("tbody"));
    node.tHead.append(row(lines[i], "th"));
    for (i += 2; i < lines.length && lines[i].trim() && lines[i].includes("|"); i++) {
      node.tBodies[0].append(row(lines[i], "td"));
    }
    const wrap = el("div");
    wrap.className = "table";
    wrap.append(node);
    root.append(wrap);
    return i;
  }

  function codeBlock(code, lang) {
    const wrap = el("div");
    wrap.className = "code";
    const bar = el("div");
    bar.className = "code-bar";
    bar.append(el("span", lang || "code"));
    if (navigator.clipboard) {  // only in secure contexts (https, localhost)
      const copy = el("button", "copy");
      copy.type = "button";
      copy.addEventListener("click", () => navigator.clipboard.writeText(code).then(
        () => { copy.textContent = "copied"; }, () => { copy.textContent = "copy failed"; }));
      bar.append(copy);
    }
    const pre = el("pre");
    const body = el("code", code);
    if (lang) body.dataset.lang = lang;
    pre.append(body);
    wrap.append(bar, pre);
    return wrap;
  }

  function link(href, label) {
    if (!/^https?:\/\//i.test(href)) return null;  // no javascript:, data:, relative urls
    const a = el("a", label === undefined ? href : undefined);
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    return label === undefined ? a : inline(a, label);
  }

  function inline(parent, text) {
    let m;
    while (text && (m = INLINE.exec(text))) {
      if (m.index) parent.append(text.slice(0, m.index));
      let node;
      if (m[1]) node = el("code", m[2]);
      else if (m[3]) {
        node = el("strong");
        node.append(inline(el("em"), m[3]));
      }
      else if (m[4] || m[5]) node = inline(el("strong"), m[4] || m[5]);
      else if (m[6] || m[7]) node = inline(el("em"), m[6] || m[7]);
      else if (m[8]) node = inline(el("del"), m[8]);
      else if (m[9]) node = link(m[10], m[9]);
      else node = link(m[11]);
      parent.append(node || m[0]);
      text = text.slice(m.index + m[0].length);
    }
    if (text) parent.append(text);
    return parent;
  }

  window.renderMarkdown = render;
})();
