// SPHINX-X in the browser with onnxruntime-web (wasm): the same steps as runtime/pipeline.py.
//
//   image -> views (encoded tiles only, tiling.js) -> vision_encoder -> image embeddings
//   sequence = [BOS] + image segments (a view's embeddings, or ONE skip embedding per padded tile)
//            + the prompt text (conv_v1_2) -> prefill -> greedy decode with the KV cache
//
// The model folder holds config.json and tokenizer.json (written by `sphinx-edge web`), and the
// three ONNX graphs named there. "onnxruntime-web" resolves through the page's import map in the
// browser (./ort/ort.wasm.min.mjs) and through node_modules in node.

import * as ort from "onnxruntime-web";

import { TextStream, argmax } from "./decoding.js";
import { imageSegments, preprocess, rgbaToRgb } from "./tiling.js";
import { Tokenizer } from "./tokenizer.js";

export class ContextOverflowError extends Error {}

export class Sphinx {
  /** Loads config.json, tokenizer.json and the three graphs from `modelUrl` (a folder URL). */
  static async load(modelUrl, { threads, onProgress = () => {} } = {}) {
    const base = new URL(modelUrl, globalThis.location?.href);
    if (!base.pathname.endsWith("/")) base.pathname += "/";
    const config = await fetchJson(new URL("config.json", base));
    const tokenizer = await Tokenizer.load(new URL("tokenizer.json", base));
    // Threads need SharedArrayBuffer, i.e. a cross-origin isolated page (the server sends COOP/COEP).
    const isolated = globalThis.crossOriginIsolated === true;
    ort.env.wasm.numThreads = isolated ? threads ?? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const sessions = {};
    for (const name of ["vision_encoder", "token_embedding", "decoder"]) {
      onProgress(`loading ${name}`);
      const graph = config.graphs[name];
      sessions[name] = await ort.InferenceSession.create(new URL(graph.model, base).href, {
        executionProviders: ["wasm"],
        graphOptimizationLevel: "all",
        externalData: graph.data.map((path) => ({ path, data: new URL(path, base).href })),
      });
    }
    return new Sphinx(config, tokenizer, sessions);
  }

  constructor(config, tokenizer, sessions) {
    this.config = config;
    this.tokenizer = tokenizer;
    this.sessions = sessions;
    this.threads = ort.env.wasm.numThreads;
  }

  /** Answers `question` about `image` ({rgb: Uint8Array, width, height}); `onText(piece)` streams
   * the answer. Returns {text, tokenIds, promptLen, imageTokens, stopReason, timings (ms)}. */
  async answer(image, question, { maxNewTokens = 256, onText = () => {} } = {}) {
    const cfg = this.config, tok = this.tokenizer;
    const timings = {};
    let t = performance.now();
    const lap = (name) => { const now = performance.now(); timings[name] = now - t; t = now; };

    const { plan, pixels, dims } = preprocess(image.rgb, image.width, image.height, cfg);
    lap("preprocess");
    const views = (await this.sessions.vision_encoder.run({ pixel_values: new ort.Tensor("float32", pixels, dims) }))
      [this.sessions.vision_encoder.outputNames[0]].data; // [nViews, tokensPerView, dim]
    lap("vision");
    timings.views = plan.nViews;

    const ids = tok.encode(cfg.prompt.before + question + cfg.prompt.after, { bos: true });
    const skip = plan.nSkipped ? await this.embed([cfg.skipId]) : null;
    const viewSize = cfg.tokensPerView * cfg.dim;
    const parts = [await this.embed(ids.slice(0, 1))];
    for (const [kind, index] of imageSegments(plan)) {
      parts.push(kind === "view" ? views.subarray(index * viewSize, (index + 1) * viewSize) : skip);
    }
    parts.push(await this.embed(ids.slice(1)));
    const embeds = concat(parts);
    const promptLen = embeds.length / cfg.dim;
    const imageTokens = promptLen - ids.length;
    if (promptLen >= cfg.maxSeqLen) {
      throw new ContextOverflowError(`the prompt takes ${promptLen} tokens (${imageTokens} for the image); ` +
        `the context holds ${cfg.maxSeqLen}. Ask a shorter question.`);
    }
    maxNewTokens = Math.min(maxNewTokens, cfg.maxSeqLen - promptLen);

    const cache = new KvCache(cfg);
    let logits = await this.forward(embeds, cache);
    lap("prefill");
    timings.prefillTokens = promptLen;

    const stream = new TextStream((x) => tok.decode(x), cfg.stopStrings);
    let stopReason = "length";
    for (let step = 0; step < maxNewTokens; step++) {
      const token = argmax(logits);
      if (token === tok.eosId) { stopReason = "eos"; break; }
      const text = stream.push(token);
      if (text) onText(text);
      if (stream.stopped) { stopReason = "stop"; break; }
      if (step + 1 < maxNewTokens) logits = await this.forward(await this.embed([token]), cache);
    }
    const tail = stream.finish();
    if (tail) onText(tail);
    lap("decode");
    timings.decodeTokens = Math.max(stream.ids.length - 1, 0); // forward passes after the prefill
    cache.dispose();
    return { text: stream.text, tokenIds: stream.ids, promptLen, imageTokens, stopReason, timings, plan };
  }

  /** Token ids -> Float32Array [L * dim] (ids may be the image specials just past the vocabulary). */
  async embed(ids) {
    const input = new ort.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
    const out = await this.sessions.token_embedding.run({ input_ids: input });
    return out[this.sessions.token_embedding.outputNames[0]].data;
  }

  /** Appends `embeds` ([T * dim]) to the cache; returns the last position's logits. */
  async forward(embeds, cache) {
    const cfg = this.config, T = embeds.length / cfg.dim, total = cache.length + T;
    const positions = new BigInt64Array(T);
    for (let i = 0; i < T; i++) positions[i] = BigInt(cache.length + i);
    const feeds = {
      inputs_embeds: new ort.Tensor("float32", embeds, [1, T, cfg.dim]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: new ort.Tensor("int64", positions, [1, T]),
      ...cache.feeds(),
    };
    const out = await this.sessions.decoder.run(feeds);
    cache.update(out, T);
    const logits = out.logits;
    const vocab = logits.dims[logits.dims.length - 1];
    return logits.data.subarray(logits.data.length - vocab); // the last position
  }
}

/** past_key_values.{i}.key|value in, present.{i}.key|value out: the decoder's KV cache. */
export class KvCache {
  constructor(cfg) {
    this.length = 0;
    this.names = [];
    for (let i = 0; i < cfg.nLayers; i++) for (const kv of ["key", "value"]) this.names.push([i, kv]);
    const empty = new ort.Tensor("float32", new Float32Array(0), [1, cfg.nKvHeads, 0, cfg.headDim]);
    this.past = this.names.map(() => empty);
  }

  feeds() {
    return Object.fromEntries(this.names.map(([i, kv], j) => [`past_key_values.${i}.${kv}`, this.past[j]]));
  }

  update(outputs, T) {
    const next = this.names.map(([i, kv]) => outputs[`present.${i}.${kv}`]);
    this.dispose();
    this.past = next;
    this.length += T;
  }

  dispose() {
    for (const p of this.past) if (p.dispose && p.size) p.dispose(); // frees wasm-side buffers, if any
  }
}

/** Decodes an image file (Blob) into RGB bytes like layout.load_image: EXIF orientation applied,
 * no colour management, transparency composited onto white. */
export async function decodeImage(blob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, {
      premultiplyAlpha: "none", colorSpaceConversion: "none", imageOrientation: "from-image",
    });
  } catch (e) {
    throw new Error(`cannot decode ${blob.name || "the image"}: not an image this browser can read (${e.message})`);
  }
  const { width, height } = bitmap;
  if (!width || !height) throw new Error(`${blob.name || "the image"} has a zero dimension (${width}x${height})`);
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, width, height, { colorSpace: "srgb" }).data;
  return { rgb: rgbaToRgb(rgba, width, height), width, height };
}

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`cannot load ${url}: HTTP ${response.status} (build the site with \`sphinx-edge web\`)`);
  return response.json();
}

function concat(arrays) {
  const out = new Float32Array(arrays.reduce((n, a) => n + a.length, 0));
  let offset = 0;
  for (const a of arrays) { out.set(a, offset); offset += a.length; }
  return out;
}
