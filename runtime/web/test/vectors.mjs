// The shared test vectors: $SPHINX_WEB_VECTORS, written by tests/runtime/web_vectors.py
// (`pytest tests/runtime/test_web.py` writes them and runs these tests).
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";

const dir = process.env.SPHINX_WEB_VECTORS;

/** false when `file` is there, else why the tests skip. */
export const missing = (file) => (dir && existsSync(join(dir, file)) ? false :
  `no ${file} in SPHINX_WEB_VECTORS (${dir ?? "unset"}): run \`pytest tests/runtime/test_web.py\`, or ` +
  "`python tests/runtime/web_vectors.py DIR` and set SPHINX_WEB_VECTORS=DIR");

export const json = (name) => JSON.parse(readFileSync(join(dir, name), "utf8"));
export const bytes = (name) => new Uint8Array(readFileSync(join(dir, name)));
export function floats(name) {
  const b = readFileSync(join(dir, name));
  return new Float32Array(b.buffer, b.byteOffset, b.length / 4);
}
