// Generates src/api/schema.gen.ts from the server's OpenAPI document (server/openapi.py).
//   node scripts/gen-api.mjs           write it
//   node scripts/gen-api.mjs --check   fail if the committed file differs from a fresh generation
// The document comes from the Python package itself (no server needs to run): $PYTHON, else the
// project's ../.venv/bin/python.
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import openapiTS, { astToString } from "openapi-typescript";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");
const target = resolve(here, "..", "src", "api", "schema.gen.ts");
const venvPython = resolve(root, ".venv", "bin", "python");
const python = process.env.PYTHON ?? (existsSync(venvPython) ? venvPython : "python3");

const json = execFileSync(
  python,
  ["-c", "import json; from server.openapi import openapi_document; print(json.dumps(openapi_document()))"],
  { cwd: root, encoding: "utf-8", maxBuffer: 16 * 1024 * 1024 },
);
const ast = await openapiTS(JSON.parse(json), { exportType: true, alphabetize: true, defaultNonNullable: false });
const header =
  "// Generated from the server's OpenAPI document by web/scripts/gen-api.mjs. Do not edit:\n" +
  "// run `npm run gen:api` in web/ after changing server/openapi.py or its models.\n";
const fresh = header + astToString(ast);

if (process.argv.includes("--check")) {
  const current = existsSync(target) ? readFileSync(target, "utf-8") : "";
  if (current !== fresh) {
    console.error(
      "web/src/api/schema.gen.ts is out of date with the server's OpenAPI document.\n" +
        "Run `cd web && npm run gen:api`, then fix what `npm run typecheck` reports.",
    );
    process.exit(1);
  }
  console.log("api types: up to date with the server's OpenAPI document");
} else {
  writeFileSync(target, fresh);
  console.log(`wrote ${target}`);
}
