// The browser phone: no plug-in, no WebRTC. The microphone (getUserMedia) is captured through
// Web Audio at 8 kHz, encoded to G.711 (µ-law or A-law, as the call's `payload_type` says) in
// this page, and sent as RTP over a WebSocket to the gateway's shard (`gateway_ws` of the
// `media` message): each binary WebSocket message carries one RTP packet, the first one a STUN
// Binding request keyed with the leg key (docs/PROTOCOL.md "Media instructions", "Keys"), which
// the gateway answers with a keyed success response before it relays anything. Incoming RTP is
// decoded here and played through an AudioWorklet with a small jitter buffer (60 ms before
// playback starts, at most 300 ms: older samples are dropped).
//
// Test hooks: `window.voxgateSentPcm` and `window.voxgateReceivedPcm` hold the 16-bit samples
// this page encoded and decoded (the first 60 s of a page's life).

const enc = new TextEncoder();
const HOOK_LIMIT = 8000 * 60;
window.voxgateSentPcm = [];
window.voxgateReceivedPcm = [];

async function hmac(hash, key, data) {
  const k = await crypto.subtle.importKey("raw", key, { name: "HMAC", hash }, false, ["sign"]);
  return new Uint8Array(await crypto.subtle.sign("HMAC", k, data));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

const hex = (bytes) => [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");

// session_key = HMAC-SHA256(StoredKey, "voxgate session key v1" 0x00 AuthMessage)
export async function sessionKey(storedKey, authMessage) {
  return hmac("SHA-256", storedKey, concat(enc.encode("voxgate session key v1\0"), enc.encode(authMessage)));
}

// The leg's STUN key: the lowercase hex text of derive("leg key", leg), as ASCII bytes.
export async function legKey(session, leg) {
  const k = await hmac("SHA-256", session, concat(enc.encode("voxgate leg key\0"), enc.encode(leg)));
  return enc.encode(hex(k));
}

// ---- STUN (RFC 8489): a Binding request with USERNAME, MESSAGE-INTEGRITY and FINGERPRINT. ----

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

export async function bindingRequest(leg, key, txid) {
  const user = enc.encode(leg);
  const padded = (user.length + 3) & ~3;
  const len = 4 + padded + 24 + 8;
  const m = new Uint8Array(20 + len);
  const v = new DataView(m.buffer);
  v.setUint16(0, 0x0001);
  v.setUint32(4, 0x2112a442);
  m.set(txid, 8);
  v.setUint16(20, 0x0006);
  v.setUint16(22, user.length);
  m.set(user, 24);
  const mi = 24 + padded;
  v.setUint16(2, mi - 20 + 24); // the length as MESSAGE-INTEGRITY sees it
  const mac = await hmac("SHA-1", key, m.subarray(0, mi));
  v.setUint16(mi, 0x0008);
  v.setUint16(mi + 2, 20);
  m.set(mac, mi + 4);
  v.setUint16(2, len);
  const fp = mi + 24;
  v.setUint16(fp, 0x8028);
  v.setUint16(fp + 2, 4);
  v.setUint32(fp + 4, (crc32(m.subarray(0, fp)) ^ 0x5354554e) >>> 0);
  return m;
}

// A Binding success response to `txid` whose MESSAGE-INTEGRITY verifies with `key`: the gateway
// proves it knows the leg key.
export async function isBindingSuccess(m, key, txid) {
  if (m.length < 20) return false;
  const v = new DataView(m.buffer, m.byteOffset, m.byteLength);
  if (v.getUint16(0) !== 0x0101 || v.getUint32(4) !== 0x2112a442) return false;
  for (let i = 0; i < 12; i++) if (m[8 + i] !== txid[i]) return false;
  let at = 20;
  while (at + 4 <= m.length) {
    const type = v.getUint16(at);
    const alen = v.getUint16(at + 2);
    if (type === 0x0008 && alen === 20 && at + 24 <= m.length) {
      const copy = m.slice(0, at);
      new DataView(copy.buffer).setUint16(2, at - 20 + 24);
      const mac = await hmac("SHA-1", key, copy);
      return mac.every((b, i) => b === m[at + 4 + i]);
    }
    at += 4 + ((alen + 3) & ~3);
  }
  return false;
}

// ---- G.711 (ITU-T G.711; the same tables the softphone uses). ----

const ULAW_END = [0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff, 0x1fff, 0x3fff, 0x7fff];
const ALAW_END = [0x1f, 0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff];
const segment = (v, ends) => {
  const i = ends.findIndex((e) => v <= e);
  return i < 0 ? 7 : i;
};

// As src/client/g711.rs: one's complement for negative samples (G.191 reference).
export function linearToUlaw(s) {
  let mask = 0xff;
  if (s < 0) {
    s = -s - 1;
    mask = 0x7f;
  }
  const biased = Math.min(s, 32635) + 0x84;
  const seg = segment(biased, ULAW_END);
  return (((seg << 4) | ((biased >> (seg + 3)) & 0x0f)) ^ mask) & 0xff;
}

export function ulawToLinear(u) {
  u = ~u & 0xff;
  const t = (((u & 0x0f) << 3) + 0x84) << ((u & 0x70) >> 4);
  return u & 0x80 ? 0x84 - t : t - 0x84;
}

export function linearToAlaw(s) {
  let v = s >> 3;
  let mask = 0xd5;
  if (v < 0) {
    v = -v - 1;
    mask = 0x55;
  }
  if (v > 0xfff) return 0x7f ^ mask;
  const seg = segment(v, ALAW_END);
  const step = seg < 2 ? (v >> 1) & 0x0f : (v >> seg) & 0x0f;
  return ((seg << 4) | step) ^ mask;
}

export function alawToLinear(a) {
  a ^= 0x55;
  let t = (a & 0x0f) << 4;
  const seg = (a & 0x70) >> 4;
  if (seg === 0) t += 8;
  else if (seg === 1) t += 0x108;
  else t = (t + 0x108) << (seg - 1);
  return a & 0x80 ? t : -t;
}

// ---- Web Audio: capture and playback in one AudioWorklet. ----

const WORKLET = `
class VoxgatePhone extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ring = new Float32Array(8000);
    this.r = 0; this.w = 0; this.n = 0; this.playing = false;
    this.port.onmessage = (e) => this.push(e.data);
  }
  push(samples) {
    const cap = this.ring.length;
    for (const s of samples) {
      if (this.n === cap) break;
      this.ring[this.w] = s; this.w = (this.w + 1) % cap; this.n++;
    }
    // At most 300 ms queued: late voice is useless, drop the oldest down to 60 ms.
    if (this.n > 2400) { const drop = this.n - 480; this.r = (this.r + drop) % cap; this.n -= drop; }
  }
  process(inputs, outputs) {
    const inp = inputs[0] && inputs[0][0];
    if (inp) this.port.postMessage(inp.slice(0));
    const out = outputs[0][0];
    if (!this.playing && this.n >= 480) this.playing = true;
    for (let i = 0; i < out.length; i++) {
      if (this.playing && this.n > 0) {
        out[i] = this.ring[this.r]; this.r = (this.r + 1) % this.ring.length; this.n--;
      } else out[i] = 0;
    }
    if (this.n === 0) this.playing = false;
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    return true;
  }
}
registerProcessor("voxgate-phone", VoxgatePhone);
`;

function rand32() {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

export class Phone {
  // `session`: the session key (bytes); `status(text)`: shows what the phone does.
  constructor(session, status) {
    this.session = session;
    this.status = status;
    this.ctx = null;
    this.node = null;
    this.ws = null;
    this.call = null;
    this.sending = false;
    this.frame = new Int16Array(160);
    this.fill = 0;
    this.seen = new Set();
  }

  // Opens the microphone and the audio graph; call it from a click (browsers start audio
  // only after a user gesture).
  async prepare() {
    if (this.ctx) return;
    this.ctx = new AudioContext({ sampleRate: 8000, latencyHint: "interactive" });
    await this.ctx.resume();
    const url = URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" }));
    await this.ctx.audioWorklet.addModule(url);
    const mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
    });
    this.node = new AudioWorkletNode(this.ctx, "voxgate-phone", { numberOfInputs: 1, outputChannelCount: [1] });
    this.ctx.createMediaStreamSource(mic).connect(this.node);
    this.node.connect(this.ctx.destination);
    this.node.port.onmessage = (e) => this.captured(e.data);
  }

  // A `media` message: bind the leg on the gateway's WebSocket media address.
  async media(m) {
    this.stopMedia();
    if (!m.gateway_ws || !m.leg) {
      this.status("The gateway gave this page no media path.");
      return;
    }
    this.call = m.call;
    this.pt = m.payload_type;
    this.encode = this.pt === 8 ? linearToAlaw : linearToUlaw;
    this.decode = this.pt === 8 ? alawToLinear : ulawToLinear;
    this.seq = rand32() & 0xffff;
    this.ts = rand32();
    this.ssrc = rand32();
    this.first = true;
    const key = await legKey(this.session, m.leg);
    const txid = crypto.getRandomValues(new Uint8Array(12));
    const req = await bindingRequest(m.leg, key, txid);
    const ws = new WebSocket(m.gateway_ws);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.bound = false;
    let tries = 0;
    const bind = () => {
      if (this.bound || ws.readyState !== WebSocket.OPEN) return;
      if (++tries > 10) {
        this.status("The gateway did not answer the media binding.");
        return;
      }
      ws.send(req);
      this.rebind = setTimeout(bind, 500);
    };
    ws.onopen = bind;
    ws.onmessage = async (ev) => {
      const b = new Uint8Array(ev.data);
      if (b.length === 0) return;
      if (b[0] < 4) {
        if (!this.bound && (await isBindingSuccess(b, key, txid))) {
          this.bound = true;
          clearTimeout(this.rebind);
          this.status("Media bound (WebSocket through the gateway).");
        }
        return;
      }
      if (this.bound) this.received(b);
    };
    ws.onclose = () => {
      if (this.ws === ws) this.status("Media connection closed.");
    };
  }

  // `media_ready`: every leg is bound; start sending.
  ready(call) {
    if (call === this.call) this.sending = true;
  }

  stopMedia() {
    this.sending = false;
    this.bound = false;
    clearTimeout(this.rebind);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close();
    }
    this.call = null;
  }

  captured(block) {
    for (const f of block) {
      const s = Math.max(-32768, Math.min(32767, Math.round(f * 32768)));
      this.frame[this.fill++] = s;
      if (this.fill === 160) {
        this.fill = 0;
        this.sendFrame();
      }
    }
  }

  sendFrame() {
    if (!this.sending || !this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    const p = new Uint8Array(12 + 160);
    const v = new DataView(p.buffer);
    p[0] = 0x80;
    p[1] = (this.first ? 0x80 : 0) | this.pt;
    this.first = false;
    v.setUint16(2, this.seq);
    v.setUint32(4, this.ts >>> 0);
    v.setUint32(8, this.ssrc);
    for (let i = 0; i < 160; i++) p[12 + i] = this.encode(this.frame[i]);
    this.seq = (this.seq + 1) & 0xffff;
    this.ts = (this.ts + 160) >>> 0;
    if (window.voxgateSentPcm.length < HOOK_LIMIT) window.voxgateSentPcm.push(...this.frame);
    this.ws.send(p);
  }

  // One RTP packet (RFC 3550): version 2; CSRCs, a header extension and padding skipped;
  // duplicates (by sequence number) dropped.
  received(b) {
    if (b.length < 12 || b[0] >> 6 !== 2) return;
    const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
    const pt = b[1] & 0x7f;
    if (pt !== 0 && pt !== 8) return;
    const seq = v.getUint16(2);
    const key = `${v.getUint32(8)}:${seq}`;
    if (this.seen.has(key)) return;
    this.seen.add(key);
    if (this.seen.size > 256) this.seen.delete(this.seen.values().next().value);
    let at = 12 + 4 * (b[0] & 0x0f);
    if (b[0] & 0x10) {
      if (at + 4 > b.length) return;
      at += 4 + 4 * v.getUint16(at + 2);
    }
    let end = b.length;
    if (b[0] & 0x20) end -= b[b.length - 1];
    if (at > end) return;
    const decode = pt === 8 ? alawToLinear : ulawToLinear;
    const out = new Float32Array(end - at);
    const hook = window.voxgateReceivedPcm;
    for (let i = at; i < end; i++) {
      const s = decode(b[i]);
      out[i - at] = s / 32768;
      if (hook.length < HOOK_LIMIT) hook.push(s);
    }
    if (this.node) this.node.port.postMessage(out, [out.buffer]);
  }
}
