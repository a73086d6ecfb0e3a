"use strict";
// Renders /openapi.json as a readable list of routes. Served from the binary: no CDN, no framework.

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}

function resolve(schema, spec, depth) {
  if (!schema || depth > 6) return schema;
  if (schema.$ref) return resolve(spec.components.schemas[schema.$ref.split("/").pop()], spec, depth + 1);
  const out = Array.isArray(schema) ? [] : {};
  for (const [key, value] of Object.entries(schema)) {
    out[key] = value && typeof value === "object" ? resolve(value, spec, depth + 1) : value;
  }
  return out;
}

function section(title, schema, spec) {
  return el("div", {}, el("h4", {}, title), el("pre", {}, JSON.stringify(resolve(schema, spec, 0), null, 2)));
}

async function main() {
  const spec = await (await fetch("/openapi.json")).json();
  document.getElementById("title").textContent = `${spec.info.title} ${spec.info.version}`;
  document.getElementById("description").textContent = spec.info.description || "";
  const byTag = {};
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      (byTag[op.tags[0]] ||= []).push({ path, method, op });
    }
  }
  const routes = document.getElementById("routes");
  routes.replaceChildren();
  for (const [tag, ops] of Object.entries(byTag)) {
    routes.append(el("h2", {}, tag));
    for (const { path, method, op } of ops) {
      const body = el("div", { class: "body" });
      if (op.description) body.append(el("p", {}, op.description));
      const request = op.requestBody && op.requestBody.content["application/json"];
      if (request) body.append(section("Request body", request.schema, spec));
      for (const [status, response] of Object.entries(op.responses)) {
        const json = response.content && response.content["application/json"];
        body.append(json ? section(`${status}: ${response.description}`, json.schema, spec)
                         : el("h4", {}, `${status}: ${response.description}`));
      }
      const lock = op.security && op.security.length ? el("span", { class: "lock" }, "key required") : "";
      routes.append(el("details", {}, el("summary", {},
        el("span", { class: `method ${method}` }, method.toUpperCase()),
        el("span", { class: "path" }, path), " ", op.summary, lock), body));
    }
  }
}

main().catch((err) => {
  document.getElementById("routes").textContent = `Could not load the API description: ${err}`;
});
