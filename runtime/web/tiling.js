// Image -> packed views, exactly as sphinx_edge/layout.py does it (docs/ARCHITECTURE.md, section 1).
//
//   RGB pixels --planTiles--> plan --makeCanvas--> canvas (Pillow bicubic, uint8)
//     --normalize--> CLIP float32 [3, S, S] --makeViews--> ConvNeXt + DINOv2 views --packViews-->
//     pixel_values [N, 3, tile + dino, tile]
//
// Pure functions over typed arrays: no DOM, so node's test runner checks them against the Python
// side (tests/runtime/test_web.py). Every float32 step of numpy is rounded with Math.fround, so the
// views agree with Python to float32 rounding (the matrix sums differ only in summation order).

export const PAD_RGB = [122, 116, 104]; // int(255 * CLIP mean): normalises to ~0
export const CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073];
export const CLIP_STD = [0.26862954, 0.26130258, 0.27577711];
export const IMAGENET_MEAN = [0.485, 0.456, 0.406];
export const IMAGENET_STD = [0.229, 0.224, 0.225];

const f32 = Math.fround;

// ------------------------------------------------------------------------------------------------
// Decoded pixels -> RGB

/** RGBA bytes -> RGB bytes, transparent pixels composited onto white with Pillow's
 * `alpha_composite` integer arithmetic (layout._to_rgb): exact for opaque and fully transparent
 * pixels. (A browser canvas stores premultiplied colour, so partly transparent pixels may already
 * be off by a level before they get here.) */
export function rgbaToRgb(rgba, width, height) {
  const n = width * height;
  if (rgba.length !== n * 4) throw new Error(`expected ${n * 4} RGBA bytes for ${width}x${height}, got ${rgba.length}`);
  const rgb = new Uint8Array(n * 3);
  for (let i = 0; i < n; i++) {
    const a = rgba[i * 4 + 3];
    for (let c = 0; c < 3; c++) {
      const s = rgba[i * 4 + c];
      let v;
      if (a === 255) v = s;
      else if (a === 0) v = 255;
      else {
        // Pillow AlphaComposite.c with dst = opaque white, PRECISION_BITS = 7.
        const outa255 = a * 255 + 255 * (255 - a);
        const coef1 = Math.floor((a * 255 * 255 * 128) / outa255);
        const coef2 = 255 * 128 - coef1;
        const tmp = s * coef1 + 255 * coef2 + (0x80 << 7);
        v = (((tmp >> 8) + tmp) >> 8) >> 7;
      }
      rgb[i * 3 + c] = v;
    }
  }
  return rgb;
}

// ------------------------------------------------------------------------------------------------
// Plan

/** (w, h) scaled so that the longer side is `side`, rounding half up (layout.fit_size). */
export function fitSize(width, height, side) {
  const longer = Math.max(width, height);
  const fit = (v) => Math.max(1, Math.floor((2 * v * side + longer) / (2 * longer)));
  return [fit(width), fit(height)];
}

/** The canvas geometry and the encoded tiles from the image size alone (layout.plan_tiles). */
export function planTiles(width, height, { layout, grid = 2, tileSize = 512, dinoSize = 224 }) {
  for (const [k, v] of Object.entries({ width, height, grid, tileSize, dinoSize })) {
    if (!Number.isInteger(v) || v < 1) throw new Error(`${k} must be a positive integer, got ${v}`);
  }
  if (layout !== "sphinx-x" && layout !== "sphinx-1k") throw new Error(`unknown layout ${layout}`);
  if (layout === "sphinx-1k" && grid !== 2) throw new Error(`the sphinx-1k layout has a 2x2 grid, got ${grid}`);
  const canvasSize = grid * tileSize;
  let contentBox, encoded;
  if (layout === "sphinx-1k") {
    const side = Math.max(width, height);
    const ox = Math.floor((side - width) / 2), oy = Math.floor((side - height) / 2);
    contentBox = [
      Math.floor((ox * canvasSize) / side), Math.floor((oy * canvasSize) / side),
      Math.ceil(((ox + width) * canvasSize) / side), Math.ceil(((oy + height) * canvasSize) / side),
    ];
    encoded = new Array(grid * grid).fill(true);
  } else {
    const [w, h] = fitSize(width, height, canvasSize);
    contentBox = [0, 0, w, h];
    // A tile is encoded iff it holds at least one image pixel; the image sits at the top-left.
    encoded = [];
    for (let r = 0; r < grid; r++) for (let c = 0; c < grid; c++) encoded.push(r * tileSize < h && c * tileSize < w);
  }
  const viewTiles = encoded.flatMap((e, i) => (e ? [i] : []));
  return {
    layout, grid, tileSize, dinoSize, imageSize: [width, height], canvasSize, contentBox, encoded, viewTiles,
    nViews: 1 + viewTiles.length, nSkipped: encoded.length - viewTiles.length,
  };
}

/** The image part of the sequence after BOS: ["view", k] per encoded view (global first), ["skip", t]
 * per fully padded tile, tiles row-major (layout.image_segments). */
export function imageSegments(plan) {
  const segments = [["view", 0]];
  let n = 1;
  plan.encoded.forEach((enc, tile) => segments.push(enc ? ["view", n++] : ["skip", tile]));
  return segments;
}

// ------------------------------------------------------------------------------------------------
// Canvas: Pillow's BICUBIC resize of 8-bit RGB (Resample.c), two passes with uint8 rounding between

const PRECISION_BITS = 32 - 8 - 2;

function pilCubic(x) { // Pillow's kernel: a = -0.5 (torch's is -0.75)
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

/** precompute_coeffs + normalize_coeffs_8bpc: per output pixel, first tap and integer weights. */
function pilCoeffs(inSize, outSize) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1); // downscaling widens the kernel (antialiasing)
  const support = 2 * filterscale;
  const ss = 1 / filterscale;
  const taps = [];
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    const k = new Float64Array(Math.max(xmax, 0));
    let ww = 0;
    for (let x = 0; x < xmax; x++) ww += (k[x] = pilCubic((x + xmin - center + 0.5) * ss));
    const fixed = new Int32Array(k.length);
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0 ? k[x] / ww : k[x];
      fixed[x] = w < 0 ? Math.trunc(-0.5 + w * (1 << PRECISION_BITS)) : Math.trunc(0.5 + w * (1 << PRECISION_BITS));
    }
    taps.push({ xmin, k: fixed });
  }
  return taps;
}

function clip8(v) {
  if (v >= (1 << PRECISION_BITS) * 256) return 255;
  if (v <= 0) return 0;
  return v >> PRECISION_BITS;
}

/** One pass along x (horizontal) or y; rgb is [h, w, 3] uint8. Integer sums stay below 2^31. */
function pilPass(src, w, h, outSize, horizontal) {
  const taps = pilCoeffs(horizontal ? w : h, outSize);
  const ow = horizontal ? outSize : w, oh = horizontal ? h : outSize;
  const out = new Uint8Array(ow * oh * 3);
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      const { xmin, k } = taps[horizontal ? x : y];
      for (let c = 0; c < 3; c++) {
        let s = 1 << (PRECISION_BITS - 1);
        for (let i = 0; i < k.length; i++) {
          const j = xmin + i;
          s += src[(horizontal ? y * w + j : j * w + x) * 3 + c] * k[i];
        }
        out[(y * ow + x) * 3 + c] = clip8(s);
      }
    }
  }
  return out;
}

/** Image.resize((outW, outH), BICUBIC) of an RGB image: horizontal pass first, an axis of equal size
 * is not resampled (Pillow skips it). */
export function resizePil(rgb, w, h, outW, outH) {
  let x = rgb;
  if (outW !== w) x = pilPass(x, w, h, outW, true);
  if (outH !== h) x = pilPass(x, outW, h, outH, false);
  return x === rgb ? rgb.slice() : x;
}

function fillRgb(size, [r, g, b]) {
  const out = new Uint8Array(size * size * 3);
  for (let i = 0; i < size * size; i++) { out[i * 3] = r; out[i * 3 + 1] = g; out[i * 3 + 2] = b; }
  return out;
}

function paste(dst, dstSize, src, w, h, ox, oy) {
  for (let y = 0; y < h; y++) dst.set(src.subarray(y * w * 3, (y + 1) * w * 3), ((oy + y) * dstSize + ox) * 3);
}

/** The canvasSize x canvasSize RGB canvas (layout.make_canvas). */
export function makeCanvas(rgb, plan) {
  const [w, h] = plan.imageSize;
  if (rgb.length !== w * h * 3) throw new Error(`expected ${w * h * 3} RGB bytes for ${w}x${h}, got ${rgb.length}`);
  const S = plan.canvasSize;
  if (plan.layout === "sphinx-1k") {
    const side = Math.max(w, h);
    const square = fillRgb(side, PAD_RGB);
    paste(square, side, rgb, w, h, Math.floor((side - w) / 2), Math.floor((side - h) / 2));
    return resizePil(square, side, side, S, S);
  }
  const [, , cw, ch] = plan.contentBox;
  const out = fillRgb(S, PAD_RGB);
  paste(out, S, resizePil(rgb, w, h, cw, ch), cw, ch, 0, 0);
  return out;
}

// ------------------------------------------------------------------------------------------------
// Views: float32, torch-style bicubic (A = -0.75, align_corners=False, antialias off)

/** CLIP-normalised float32 [3, S, S] from an RGB canvas (layout.normalize, bit-exact). */
export function normalize(canvas, size) {
  const n = size * size;
  const out = new Float32Array(3 * n);
  for (let c = 0; c < 3; c++) {
    const mean = f32(CLIP_MEAN[c]), std = f32(CLIP_STD[c]);
    for (let i = 0; i < n; i++) out[c * n + i] = f32(f32(f32(canvas[i * 3 + c] / 255) - mean) / std);
  }
  return out;
}

const A = -0.75;
const cubicNear = (d) => ((A + 2) * d - (A + 3)) * d * d + 1; // |d| <= 1
const cubicFar = (d) => ((A * d - 5 * A) * d + 8 * A) * d - 4 * A; // 1 < |d| < 2

/** layout._bicubic_matrix as sparse rows: per output index, {index: weight} with clamped taps added.
 * The source coordinate emulates torch's float32 fused multiply-add, as the Python does. */
function torchTaps(inSize, outSize) {
  const scale = f32(f32(inSize) / f32(outSize));
  const rows = [];
  for (let i = 0; i < outSize; i++) {
    const src = f32(scale * f32(i + 0.5) - 0.5);
    const base = Math.floor(src);
    const t = f32(src - base);
    const weights = [cubicFar(t + 1), cubicNear(t), cubicNear(1 - t), cubicFar(2 - t)];
    const row = new Map();
    weights.forEach((wt, k) => {
      const j = Math.min(Math.max(base - 1 + k, 0), inSize - 1);
      row.set(j, (row.get(j) ?? 0) + f32(wt));
    });
    rows.push([...row].map(([j, wt]) => [j, f32(wt)]));
  }
  return rows;
}

/** [C, H, W] float32 -> [C, outH, outW] (layout.resize_bicubic): width pass, then height pass. */
export function resizeBicubic(x, C, H, W, outH, outW) {
  const tw = torchTaps(W, outW), th = torchTaps(H, outH);
  const tmp = new Float32Array(C * H * outW);
  for (let p = 0; p < C * H; p++) {
    for (let o = 0; o < outW; o++) {
      let s = 0;
      for (const [j, wt] of tw[o]) s += x[p * W + j] * wt;
      tmp[p * outW + o] = s;
    }
  }
  const out = new Float32Array(C * outH * outW);
  for (let c = 0; c < C; c++) {
    for (let o = 0; o < outH; o++) {
      const dst = (c * outH + o) * outW;
      for (const [j, wt] of th[o]) {
        const srcRow = (c * H + j) * outW;
        for (let q = 0; q < outW; q++) out[dst + q] += tmp[srcRow + q] * wt;
      }
    }
  }
  return out;
}

/** Crop [3, side, side] at tile `index` of a grid of `side` cells from a [3, S, S] map. */
function crop(x, S, plan, index, side) {
  const r = Math.floor(index / plan.grid), c = index % plan.grid;
  const out = new Float32Array(3 * side * side);
  for (let ch = 0; ch < 3; ch++) {
    for (let y = 0; y < side; y++) {
      const from = (ch * S + r * side + y) * S + c * side;
      out.set(x.subarray(from, from + side), (ch * side + y) * side);
    }
  }
  return out;
}

/** {convnext: [[3, tile, tile] per view], dinov2: [[3, dino, dino] per view]} (layout.make_views);
 * views: the global view, then the encoded tiles row-major. */
export function makeViews(rgb, plan) {
  const S = plan.canvasSize, tile = plan.tileSize, dino = plan.dinoSize, G = plan.grid * dino;
  const x = normalize(makeCanvas(rgb, plan), S);
  // ConvNeXt: the global view is resampled; the tiles are raw crops of the canvas.
  const convnext = [resizeBicubic(x, 3, S, S, tile, tile), ...plan.viewTiles.map((i) => crop(x, S, plan, i, tile))];
  // DINOv2: the tiles are crops of the canvas resampled to grid * dino.
  const dinoGrid = resizeBicubic(x, 3, S, S, G, G);
  const dinov2 = [resizeBicubic(x, 3, S, S, dino, dino), ...plan.viewTiles.map((i) => crop(dinoGrid, G, plan, i, dino))];
  // Re-normalise CLIP -> ImageNet statistics in place of a second pass from the pixels.
  for (const v of dinov2) {
    for (let c = 0; c < 3; c++) {
      const gain = f32(CLIP_STD[c] / IMAGENET_STD[c]);
      const shift = f32((CLIP_MEAN[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c]);
      for (let i = c * dino * dino; i < (c + 1) * dino * dino; i++) v[i] = f32(f32(v[i] * gain) + shift);
    }
  }
  return { convnext, dinov2 };
}

/** Float32 [N, 3, tile + dino, tile]: ConvNeXt view in rows [0, tile), DINOv2 view in the first dino
 * columns of the rows below, zeros elsewhere (layout.pack_views). */
export function packViews({ convnext, dinov2 }, tile, dino) {
  if (dino > tile) throw new Error(`the DINOv2 view (${dino} px) must not be larger than the ConvNeXt tile (${tile} px)`);
  const H = tile + dino, n = convnext.length;
  const out = new Float32Array(n * 3 * H * tile);
  for (let v = 0; v < n; v++) {
    for (let c = 0; c < 3; c++) {
      const base = (v * 3 + c) * H * tile;
      out.set(convnext[v].subarray(c * tile * tile, (c + 1) * tile * tile), base);
      for (let y = 0; y < dino; y++) {
        out.set(dinov2[v].subarray((c * dino + y) * dino, (c * dino + y + 1) * dino), base + (tile + y) * tile);
      }
    }
  }
  return out;
}

/** RGB bytes -> {plan, pixels (Float32Array [nViews, 3, tile + dino, tile]), dims}. `cfg`: the
 * layout, grid, tileSize and dinoSize of config.json. */
export function preprocess(rgb, width, height, cfg) {
  const plan = planTiles(width, height, cfg);
  const pixels = packViews(makeViews(rgb, plan), plan.tileSize, plan.dinoSize);
  return { plan, pixels, dims: [plan.nViews, 3, plan.tileSize + plan.dinoSize, plan.tileSize] };
}
