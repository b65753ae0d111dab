// tokenizer.js == sentencepiece (ids and decoded text) on the shared vectors.
import assert from "node:assert/strict";
import { test } from "node:test";

import { Tokenizer } from "../tokenizer.js";
import { json, missing } from "./vectors.mjs";

const skip = missing("tokenizer_cases.json");
if (skip) {
  test("tokenizer vectors", { skip }, () => {});
} else {
  const tok = new Tokenizer(json("tokenizer.json"));
  const { encode, decode } = json("tokenizer_cases.json");

  test(`encode: ${encode.length} strings give sentencepiece's ids`, () => {
    for (const c of encode) assert.deepEqual(tok.encode(c.text, { bos: true }), c.ids, `ids of ${JSON.stringify(c.text)}`);
  });

  test(`decode: round trips and ${decode.length} id runs give sentencepiece's text`, () => {
    for (const c of encode) assert.equal(tok.decode(c.ids.slice(1)), c.decoded, `decode of ${JSON.stringify(c.text)}`);
    for (const c of decode) assert.equal(tok.decode(c.ids), c.decoded, `decode of ${JSON.stringify(c.ids)}`);
  });
}
