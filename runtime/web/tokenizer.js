// A SentencePiece BPE tokenizer from a JSON vocabulary (`tokenizer.json`, written by
// sphinx_edge/runtime/web_bundle.py from `tokenizer.model`). It reproduces sentencepiece's own
// algorithm (bpe_model.cc + sentencepiece_processor.cc), so the ids equal `SentencePieceProcessor`'s:
//
//   encode: escape spaces as "▁" (plus a dummy prefix) -> one symbol per character, user-defined
//   symbols ("\n") whole and frozen -> repeatedly merge the adjacent pair whose merged piece has the
//   highest score (leftmost on ties) -> unknown pieces fall back to their UTF-8 bytes ("<0xNN>").
//   decode: "▁" -> " ", the first piece's leading space dropped, runs of byte pieces decoded as
//   UTF-8 with one U+FFFD per invalid byte, control pieces invisible, <unk> shown as " ⁇ ".

const SPACE = "\u2581"; // "▁"
const UTF8 = new TextDecoder("utf-8", { ignoreBOM: true }); // keep a U+FEFF, as sentencepiece does
// ModelProto.SentencePiece.Type
const NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6;

export class Tokenizer {
  /** `spec`: the parsed tokenizer.json ({pieces: [[piece, score, type], ...], ...}). */
  constructor(spec) {
    if (spec.model_type !== "BPE") throw new Error(`only SentencePiece BPE models are supported, got ${spec.model_type}`);
    if (spec.treat_whitespace_as_suffix) throw new Error("treat_whitespace_as_suffix is not supported");
    this.spec = spec;
    this.pieces = spec.pieces.map((p) => p[0]);
    this.scores = spec.pieces.map((p) => p[1]);
    this.types = spec.pieces.map((p) => p[2]);
    this.bosId = spec.bos_id;
    this.eosId = spec.eos_id;
    this.unkId = spec.unk_id;
    this.vocabSize = this.pieces.length;
    // sentencepiece keeps two maps: mergeable pieces (normal, user-defined, unused) and reserved ones.
    this.mergeable = new Map();
    this.reserved = new Map();
    this.userDefined = [];
    this.byteIds = new Array(256);
    this.pieces.forEach((piece, id) => {
      const type = this.types[id];
      if (type === NORMAL || type === USER_DEFINED || type === UNUSED) this.mergeable.set(piece, id);
      else this.reserved.set(piece, id);
      if (type === USER_DEFINED) this.userDefined.push(piece);
      if (type === BYTE) this.byteIds[parseInt(piece.slice(3, 5), 16)] = id;
    });
    this.userDefined.sort((a, b) => b.length - a.length); // longest match first
  }

  static async load(url) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`cannot load the tokenizer ${url}: HTTP ${response.status}`);
    return new Tokenizer(await response.json());
  }

  pieceToId(piece) {
    return this.reserved.get(piece) ?? this.mergeable.get(piece) ?? this.unkId;
  }

  normalize(text) {
    if (this.spec.remove_extra_whitespaces) text = text.replace(/ +/g, " ").replace(/^ | $/g, "");
    if (text.length === 0) return "";
    if (this.spec.add_dummy_prefix) text = " " + text;
    return this.spec.escape_whitespaces === false ? text : text.replaceAll(" ", SPACE);
  }

  /** The ids of `text`; BOS / EOS added on request (as sphinx_edge.tokenizer.Tokenizer.encode). */
  encode(text, { bos = false, eos = false } = {}) {
    const ids = [];
    let prevUnk = false;
    for (const piece of this.bpe(this.normalize(text))) {
      const id = this.pieceToId(piece);
      const isUnk = id === this.unkId;
      if (isUnk && this.spec.byte_fallback) {
        for (const b of new TextEncoder().encode(piece)) ids.push(this.byteIds[b]);
      } else if (!(isUnk && prevUnk)) { // without byte fallback a run of unknowns is one <unk>
        ids.push(id);
      }
      prevUnk = isUnk;
    }
    return [...(bos ? [this.bosId] : []), ...ids, ...(eos ? [this.eosId] : [])];
  }

  /** BPE over a normalised string: the final pieces (strings). */
  bpe(normalized) {
    const symbols = []; // {piece, frozen}
    for (let i = 0; i < normalized.length;) {
      const user = this.userDefined.find((u) => normalized.startsWith(u, i));
      const len = user ? user.length : normalized.codePointAt(i) > 0xffff ? 2 : 1;
      symbols.push({ piece: normalized.slice(i, i + len), frozen: Boolean(user) });
      i += len;
    }
    const revMerge = new Map(); // unused merged piece -> its two parts, to split it again
    // Texts here are short (a prompt), so a scan per merge is plenty; it picks the same pair as
    // sentencepiece's agenda: the highest score, then the leftmost.
    for (;;) {
      let best = -1, bestScore = -Infinity;
      for (let i = 0; i + 1 < symbols.length; i++) {
        if (symbols[i].frozen || symbols[i + 1].frozen) continue;
        const id = this.mergeable.get(symbols[i].piece + symbols[i + 1].piece);
        if (id !== undefined && this.scores[id] > bestScore) { best = i; bestScore = this.scores[id]; }
      }
      if (best < 0) break;
      const [l, r] = [symbols[best].piece, symbols[best + 1].piece];
      if (this.types[this.mergeable.get(l + r)] === UNUSED) revMerge.set(l + r, [l, r]);
      symbols.splice(best, 2, { piece: l + r, frozen: false });
    }
    const out = [];
    const resegment = (piece) => {
      const parts = this.types[this.mergeable.get(piece)] === UNUSED && revMerge.get(piece);
      if (parts) parts.forEach(resegment); else out.push(piece);
    };
    symbols.forEach((s) => resegment(s.piece));
    return out;
  }

  /** Text of `ids` (ids outside the vocabulary, e.g. image specials, are dropped, as in Python). */
  decode(ids) {
    let text = "";
    let bytes = [];
    let isBosWs = true, bosWsSeen = false;
    const flush = () => { text += decodeUtf8Bytes(bytes); bytes = []; };
    for (const id of ids) {
      if (!(id >= 0 && id < this.vocabSize)) continue;
      const type = this.types[id];
      if (type === BYTE) { bytes.push(parseInt(this.pieces[id].slice(3, 5), 16)); continue; }
      flush();
      if (bosWsSeen || text.length > 0) isBosWs = false;
      bosWsSeen = false;
      if (type === CONTROL) continue;
      if (type === UNKNOWN) { text += this.spec.unk_surface || " \u2047 "; continue; }
      let piece = this.pieces[id];
      if (isBosWs && (this.spec.add_dummy_prefix || this.spec.remove_extra_whitespaces) && piece.startsWith(SPACE)) {
        piece = piece.slice(1);
        bosWsSeen = !this.spec.remove_extra_whitespaces;
      }
      text += piece.replaceAll(SPACE, " ");
    }
    flush();
    return text;
  }
}

/** UTF-8 bytes -> string; each byte that does not start a valid character becomes one U+FFFD
 * (sentencepiece's rule; TextDecoder would merge some invalid runs into one). */
export function decodeUtf8Bytes(bytes) {
  let out = "";
  for (let i = 0; i < bytes.length;) {
    const n = validCharLength(bytes, i);
    if (n === 0) { out += "\ufffd"; i += 1; continue; }
    out += UTF8.decode(Uint8Array.from(bytes.slice(i, i + n)));
    i += n;
  }
  return out;
}

function validCharLength(b, i) {
  const c = b[i];
  const cont = (k) => i + k < b.length && (b[i + k] & 0xc0) === 0x80;
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) return cont(1) ? 2 : 0;
  if (c >= 0xe0 && c <= 0xef) {
    if (!cont(1) || !cont(2)) return 0;
    const cp = ((c & 0x0f) << 12) | ((b[i + 1] & 0x3f) << 6) | (b[i + 2] & 0x3f);
    return cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff) ? 0 : 3; // overlong or a surrogate
  }
  if (c >= 0xf0 && c <= 0xf4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    const cp = ((c & 0x07) << 18) | ((b[i + 1] & 0x3f) << 12) | ((b[i + 2] & 0x3f) << 6) | (b[i + 3] & 0x3f);
    return cp < 0x10000 || cp > 0x10ffff ? 0 : 4;
  }
  return 0;
}
