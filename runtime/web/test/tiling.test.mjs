// tiling.js == sphinx_edge/layout.py on the shared vectors: same RGB, plan, canvas, views.
import assert from "node:assert/strict";
import { test } from "node:test";

import { imageSegments, makeCanvas, planTiles, preprocess, rgbaToRgb } from "../tiling.js";
import { bytes, floats, json, missing } from "./vectors.mjs";

const skip = missing("tiling.json");
const cases = skip ? [] : json("tiling.json");
if (skip) test("tiling vectors", { skip }, () => {});

for (const c of cases) {
  test(`tiling ${c.name} (${c.width}x${c.height}, ${c.cfg.layout}, grid ${c.cfg.grid}, tile ${c.cfg.tileSize})`, () => {
    const rgb = rgbaToRgb(bytes(`${c.name}.rgba`), c.width, c.height);
    assert.deepEqual(rgb, bytes(`${c.name}.rgb`), "RGBA -> RGB differs from layout.load_image");

    const plan = planTiles(c.width, c.height, c.cfg);
    assert.equal(plan.canvasSize, c.canvasSize);
    assert.deepEqual(plan.contentBox, c.contentBox);
    assert.deepEqual(plan.encoded, c.encoded);
    assert.deepEqual(imageSegments(plan), c.segments);

    const canvas = makeCanvas(rgb, plan), want = bytes(`${c.name}.canvas`);
    const wrong = canvas.reduce((n, v, i) => n + (v !== want[i]), 0);
    assert.equal(wrong, 0, `${wrong} canvas bytes differ from Pillow's resize`);

    const { pixels, dims } = preprocess(rgb, c.width, c.height, c.cfg);
    assert.deepEqual(dims, c.viewsShape);
    const expected = floats(`${c.name}.views`);
    assert.equal(pixels.length, expected.length);
    let maxDiff = 0;
    for (let i = 0; i < pixels.length; i++) maxDiff = Math.max(maxDiff, Math.abs(pixels[i] - expected[i]));
    assert.ok(maxDiff <= 1e-4, `views differ by up to ${maxDiff}`);
  });
}

test("bad input is refused", () => {
  assert.throws(() => planTiles(0, 5, { layout: "sphinx-x" }), /width must be a positive integer/);
  assert.throws(() => planTiles(5, 5, { layout: "nope" }), /unknown layout/);
  assert.throws(() => rgbaToRgb(new Uint8Array(7), 2, 1), /expected 8 RGBA bytes/);
});
