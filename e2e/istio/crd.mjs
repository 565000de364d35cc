// Validates objects as a Kubernetes API server holding Istio 1.30.3's CRDs (crds-1.30.3.yaml,
// TrafficExtension, WasmPlugin and EnvoyFilter, unchanged from Istio) would:
// - the structural schema with ajv: types, enums, required fields, patterns, lengths, ranges,
//   formats, oneOf; an unknown field is refused, as under kubectl's strict field validation
//   (the default), except where the schema preserves unknown fields (pluginConfig);
// - `x-kubernetes-list-type: map` lists: no two entries with the same keys;
// - every `x-kubernetes-validations` CEL rule, evaluated with @bufbuild/cel, plus the two
//   functions of Kubernetes' CEL URL library the rules call (`isURL`, `url(...).getScheme()`).
// A refusal names the field and, for a CEL rule, its message and the rule itself.
import { readFileSync } from "node:fs";
import Ajv from "ajv";
import { parseAllDocuments } from "yaml";
import { run, celFunc, celMethod, CelScalar, isCelError } from "@bufbuild/cel";

const SCHEME = /^([a-zA-Z][a-zA-Z0-9+.-]*):/;

// Kubernetes' `isURL` is Go's url.ParseRequestURI succeeding: an absolute URL or an absolute path.
function isURL(s) {
  if (s.startsWith("/")) return true;
  if (!SCHEME.test(s)) return false;
  try {
    new URL(s);
    return true;
  } catch {
    return false;
  }
}

// `url(s)` is kept as its string; `getScheme()` reads the scheme off it ("" for a path).
const urlLibrary = [
  celFunc("isURL", [CelScalar.STRING], CelScalar.BOOL, isURL),
  celFunc("url", [CelScalar.STRING], CelScalar.STRING, (s) => s),
  celMethod("getScheme", CelScalar.STRING, [], CelScalar.STRING, function () {
    return SCHEME.exec(this)?.[1] ?? "";
  }),
];

/** A structural schema as ajv reads it: objects that list their properties and do not
 * preserve unknown fields refuse any other. */
function forAjv(schema) {
  if (Array.isArray(schema)) return schema.map(forAjv);
  if (schema === null || typeof schema !== "object") return schema;
  const out = {};
  for (const [k, v] of Object.entries(schema)) {
    if (k.startsWith("x-kubernetes-") || k === "description") continue;
    out[k] = k === "properties" ? Object.fromEntries(Object.entries(v).map(([p, s]) => [p, forAjv(s)])) : forAjv(v);
  }
  if (schema.properties && !schema["x-kubernetes-preserve-unknown-fields"] && schema.additionalProperties === undefined) {
    out.additionalProperties = false;
  }
  if (schema["x-kubernetes-int-or-string"]) delete out.type;
  return out;
}

function newAjv() {
  const ajv = new Ajv({ allErrors: true, strict: false });
  ajv.addFormat("int32", { type: "number", validate: (n) => Number.isInteger(n) && n >= -(2 ** 31) && n < 2 ** 31 });
  ajv.addFormat("date-time", /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/i);
  return ajv;
}

/** `apiVersion kind` -> { schema, check } for every CRD version in `text`. */
export function loadCrds(text) {
  const ajv = newAjv();
  const crds = new Map();
  for (const doc of parseAllDocuments(text)) {
    const crd = doc.toJS();
    if (crd?.kind !== "CustomResourceDefinition") continue;
    for (const version of crd.spec.versions) {
      const schema = version.schema.openAPIV3Schema;
      // The API server checks apiVersion, kind and metadata itself, before the CRD's schema.
      const root = forAjv(schema);
      root.properties = { ...root.properties, apiVersion: { type: "string" }, kind: { type: "string" }, metadata: { type: "object" } };
      crds.set(`${crd.spec.group}/${version.name} ${crd.spec.names.kind}`, { schema, check: ajv.compile(root) });
    }
  }
  return crds;
}

export function readCrds(path) {
  return loadCrds(readFileSync(path, "utf8"));
}

/** The value as CEL sees it: integers as CEL ints, objects as maps. */
function toCel(value, schema) {
  if (Array.isArray(value)) return value.map((v) => toCel(v, schema?.items));
  if (value !== null && typeof value === "object") {
    return new Map(Object.entries(value).map(([k, v]) => [k, toCel(v, schema?.properties?.[k] ?? schemaOf(schema?.additionalProperties))]));
  }
  if (typeof value === "number" && Number.isInteger(value) && schema?.type === "integer") return BigInt(value);
  return value;
}

function schemaOf(additional) {
  return additional !== null && typeof additional === "object" ? additional : undefined;
}

/** CEL rules and list-map keys, walking `value` along `schema`. */
function walk(schema, value, path, errors) {
  if (!schema || value === undefined) return;
  const at = path || "/";
  for (const v of schema["x-kubernetes-validations"] ?? []) {
    const result = run(v.rule, { self: toCel(value, schema) }, { funcs: urlLibrary });
    if (isCelError(result)) errors.push(`${at}: rule failed to evaluate: ${result.message} (rule: ${v.rule})`);
    else if (result !== true) errors.push(`${at}: ${v.message} (x-kubernetes-validations rule: ${v.rule.replace(/\s+/g, " ")})`);
  }
  if (Array.isArray(value)) {
    if (schema["x-kubernetes-list-type"] === "map") {
      const keys = schema["x-kubernetes-list-map-keys"] ?? [];
      const seen = new Set();
      value.forEach((item, i) => {
        const key = JSON.stringify(keys.map((k) => item?.[k]));
        if (seen.has(key)) errors.push(`${path}/${i}: duplicate entry for key ${keys.join(",")} = ${key}`);
        seen.add(key);
      });
    }
    value.forEach((item, i) => walk(schema.items, item, `${path}/${i}`, errors));
    return;
  }
  if (value === null || typeof value !== "object") return;
  for (const [k, v] of Object.entries(value)) {
    walk(schema.properties?.[k] ?? schemaOf(schema.additionalProperties), v, `${path}/${k}`, errors);
  }
}

function describe(e) {
  if (e.keyword === "additionalProperties") return `unknown field ${e.instancePath}/${e.params.additionalProperty}`;
  return `${e.instancePath || "/"} ${e.message}${e.params?.allowedValues ? ` (${e.params.allowedValues.join(", ")})` : ""}`;
}

/** Why `obj` would be refused (empty when accepted); undefined when no CRD defines its kind. */
export function refusals(crds, obj) {
  const crd = crds.get(`${obj.apiVersion} ${obj.kind}`);
  if (!crd) return undefined;
  const errors = [];
  if (!obj.metadata?.name) errors.push("/metadata/name is required");
  if (!crd.check(obj)) errors.push(...crd.check.errors.map(describe));
  walk(crd.schema, obj, "", errors);
  return errors;
}
