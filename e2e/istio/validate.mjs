// Validates Kubernetes manifests:
// - Istio kinds (TrafficExtension, WasmPlugin, EnvoyFilter) against Istio 1.30.3's CRDs, CEL
//   rules included (crd.mjs, crds-1.30.3.yaml), and, for the kinds Istio 1.29 has (WasmPlugin,
//   EnvoyFilter), also against Istio 1.29's schemas (@kubernetes-models/istio), since the
//   WasmPlugin pair is what Istio 1.20 to 1.29 users apply;
// - PrometheusRule against the Prometheus Operator's schema (@kubernetes-models/prometheus-operator)
//   and Deployments against Kubernetes' OpenAPI schemas (kubernetes-models).
// The kubernetes-models schemas let unknown fields through (the API server would prune them, or
// refuse them under kubectl's default strict field validation), so unknown fields are found
// separately, from the same packages' generated type declarations.
// Usage: node validate.mjs FILE... (a FILE of "-" reads standard input, e.g. kustomize output).
// Prints one line per object; exits 1 if any object is invalid or of a kind it cannot check.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import ts from "typescript";
import { parseAllDocuments } from "yaml";
import * as istioExtensions from "@kubernetes-models/istio/extensions.istio.io/v1alpha1";
import * as istioNetworking from "@kubernetes-models/istio/networking.istio.io/v1alpha3";
import * as monitoring from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import * as apps from "kubernetes-models/apps/v1";
import * as core from "kubernetes-models/v1";
import { readCrds, refusals } from "./crd.mjs";

const crds = readCrds(fileURLToPath(new URL("./crds-1.30.3.yaml", import.meta.url)));

const models = {
  "extensions.istio.io/v1alpha1": istioExtensions,
  "networking.istio.io/v1alpha3": istioNetworking,
  "monitoring.coreos.com/v1": monitoring,
  "apps/v1": apps,
  "v1": core,
};

const declarations = {
  "extensions.istio.io/v1alpha1": "@kubernetes-models/istio/extensions.istio.io/v1alpha1",
  "networking.istio.io/v1alpha3": "@kubernetes-models/istio/networking.istio.io/v1alpha3",
  "monitoring.coreos.com/v1": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1",
  "apps/v1": "kubernetes-models/apps/v1",
  "v1": "kubernetes-models/v1",
};

/** The declared type of a kind (`IWasmPlugin`), and the checker that can walk it. */
function declaredType(apiVersion, kind) {
  const js = fileURLToPath(import.meta.resolve(`${declarations[apiVersion]}/${kind}`));
  const dir = js.replace(/\.js$/, ".d.ts");
  const program = ts.createProgram([dir], { noEmit: true, skipLibCheck: true });
  const checker = program.getTypeChecker();
  const source = program.getSourceFile(dir);
  const symbol = checker.getSymbolAtLocation(source).exports.get(`I${kind}`);
  return { checker, type: checker.getDeclaredTypeOfSymbol(symbol) };
}

/** Every field of `value` that `type` does not declare, as JSON pointers. A union (a CRD's
 * oneOf) declares what any of its members declares. */
function unknownFields(checker, value, type, path, found) {
  type = checker.getNonNullableType(type);
  const members = (type.isUnion() ? type.types : [type]).filter(
    (t) => t.flags & ts.TypeFlags.Object || t.isIntersection(),
  );
  if (members.length === 0) return;
  if (Array.isArray(value)) {
    const element = members.map((m) => (checker.isArrayType(m) ? checker.getTypeArguments(m)[0] : undefined)).find(Boolean);
    if (element) value.forEach((v, i) => unknownFields(checker, v, element, `${path}/${i}`, found));
    return;
  }
  if (value === null || typeof value !== "object") return;
  const index = members.map((m) => checker.getIndexTypeOfType(m, ts.IndexKind.String)).find(Boolean);
  if (index) {
    for (const [k, v] of Object.entries(value)) unknownFields(checker, v, index, `${path}/${k}`, found);
    return;
  }
  const props = members.flatMap((m) => checker.getPropertiesOfType(m));
  if (props.length === 0) return; // `{}`: x-kubernetes-preserve-unknown-fields, e.g. pluginConfig
  for (const [k, v] of Object.entries(value)) {
    const prop = props.find((p) => p.name === k);
    if (!prop) {
      found.push(`${path}/${k}`);
      continue;
    }
    const decl = prop.valueDeclaration ?? prop.declarations?.[0];
    unknownFields(checker, v, checker.getTypeOfSymbolAtLocation(prop, decl), `${path}/${k}`, found);
  }
}

const typesByKind = new Map();
function unknownFieldsOf(obj) {
  const key = `${obj.apiVersion} ${obj.kind}`;
  if (!typesByKind.has(key)) typesByKind.set(key, declaredType(obj.apiVersion, obj.kind));
  const { checker, type } = typesByKind.get(key);
  const found = [];
  unknownFields(checker, obj, type, "", found);
  return found;
}

let failed = 0;
for (const file of process.argv.slice(2)) {
  const text = readFileSync(file === "-" ? 0 : file, "utf8");
  for (const doc of parseAllDocuments(text)) {
    if (doc.errors.length) {
      console.log(`INVALID ${file}: YAML: ${doc.errors.map((e) => e.message).join("; ")}`);
      failed++;
      continue;
    }
    const obj = doc.toJS();
    if (obj === null) continue; // an empty document (a trailing ---)
    const name = `${file}: ${obj.kind}/${obj.metadata?.name}`;
    const refused = refusals(crds, obj);
    const Model = models[obj.apiVersion]?.[obj.kind];
    if (!Model && !refused) {
      console.log(`INVALID ${name}: no schema for ${obj.apiVersion} ${obj.kind}`);
      failed++;
      continue;
    }
    if (refused?.length) {
      console.log(`INVALID ${name}: Istio 1.30.3 CRD: ${refused.join("; ")}`);
      failed++;
      continue;
    }
    if (!Model) {
      console.log(`ok ${name} (Istio 1.30.3 CRD, CEL rules)`);
      continue;
    }
    try {
      new Model(obj).validate();
      const unknown = unknownFieldsOf(obj);
      if (unknown.length) {
        console.log(`INVALID ${name}: unknown field ${unknown.join(", unknown field ")}`);
        failed++;
        continue;
      }
      console.log(`ok ${name}${refused ? " (Istio 1.30.3 CRD, CEL rules; Istio 1.29 schema)" : ""}`);
    } catch (e) {
      const details = (e.errors ?? []).map((x) => `${x.instancePath || "/"} ${x.message}`).join("; ");
      console.log(`INVALID ${name}: ${details || e.message}`);
      failed++;
    }
  }
}
process.exit(failed ? 1 : 0);
