// Greedy token choice and streamed detokenisation with stop strings: sphinx_edge/decoding.py in JS.

/** Index of the largest logit; the first one on ties, as numpy's argmax. */
export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

/** Detokenises generated ids incrementally and holds back text that may start a stop string
 * (decoding.TextStream): push(id) returns the newly final text; `stopped` turns true once a stop
 * string appears (it and anything after it are never emitted). */
export class TextStream {
  constructor(decode, stopStrings = ["\n###"]) {
    this.decode = decode;
    this.stopStrings = stopStrings;
    this.ids = [];
    this.text = "";
    this.stopped = false;
  }

  push(id) {
    this.ids.push(id);
    const full = this.decode(this.ids);
    const hits = this.stopStrings.map((s) => full.indexOf(s)).filter((i) => i >= 0);
    if (hits.length) {
      this.stopped = true;
      return this.emit(full.slice(0, Math.min(...hits)));
    }
    let safe = full.length;
    if (full.endsWith("\ufffd")) safe -= 1; // an incomplete multi-byte character: wait for the rest
    for (const stop of this.stopStrings) {
      for (let n = Math.min(stop.length - 1, full.length); n > 0; n--) {
        if (full.endsWith(stop.slice(0, n))) { safe = Math.min(safe, full.length - n); break; }
      }
    }
    return this.emit(full.slice(0, safe));
  }

  /** The held-back remainder at the end of generation (when no stop string came). */
  finish() {
    return this.stopped ? "" : this.emit(this.decode(this.ids).replace(/\ufffd+$/, ""));
  }

  emit(upto) {
    if (!upto.startsWith(this.text)) return "";
    const added = upto.slice(this.text.length);
    this.text = upto;
    return added;
  }
}
