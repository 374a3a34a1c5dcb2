// SCRAM-SHA-256 (RFC 5802 §3, RFC 7677) in the page, with WebCrypto: the verifier the gateway
// stores (salt, iterations, StoredKey, ServerKey), computed here so that the password never
// leaves the browser.

const enc = new TextEncoder();

export function b64(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s);
}

export function unb64(text) {
  return Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
}

async function hmac(key, data) {
  const k = await crypto.subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return new Uint8Array(await crypto.subtle.sign("HMAC", k, enc.encode(data)));
}

// SaltedPassword := Hi(password, salt, i) = PBKDF2-HMAC-SHA-256.
export async function saltedPassword(password, salt, iterations) {
  const k = await crypto.subtle.importKey("raw", enc.encode(password), "PBKDF2", false, ["deriveBits"]);
  const bits = await crypto.subtle.deriveBits(
    { name: "PBKDF2", hash: "SHA-256", salt, iterations }, k, 256);
  return new Uint8Array(bits);
}

// { salt, iterations, stored_key, server_key }, base64, as `voxgate user add` stores them.
export async function makeVerifier(password, saltB64, iterations) {
  const salted = await saltedPassword(password, unb64(saltB64), iterations);
  const clientKey = await hmac(salted, "Client Key");
  const storedKey = new Uint8Array(await crypto.subtle.digest("SHA-256", clientKey));
  const serverKey = await hmac(salted, "Server Key");
  return { salt: saltB64, iterations, stored_key: b64(storedKey), server_key: b64(serverKey) };
}

// A rough entropy estimate: length × log2(size of the character classes used), discounting
// repeated characters. Enough to refuse "aaaaaaaa" and "password".
export function passwordBits(pw) {
  let pool = 0;
  if (/[a-z]/.test(pw)) pool += 26;
  if (/[A-Z]/.test(pw)) pool += 26;
  if (/[0-9]/.test(pw)) pool += 10;
  if (/[^a-zA-Z0-9]/.test(pw)) pool += 33;
  const distinct = new Set(pw).size;
  const len = Math.min([...pw].length, distinct * 2);
  return Math.floor(len * Math.log2(Math.max(pool, 1)));
}

const COMMON = ["password", "12345678", "123456789", "qwertyui", "iloveyou", "letmein1", "voxgate"];

// Why this password is too weak, or null.
export function passwordProblem(pw, user, minChars, minBits) {
  if ([...pw].length < minChars) return `the password must have at least ${minChars} characters`;
  const low = pw.toLowerCase();
  if (user && low.includes(user.toLowerCase())) return "the password must not contain the user id";
  if (COMMON.some((c) => low.includes(c))) return "the password is a well-known one";
  const bits = passwordBits(pw);
  if (bits < minBits) return `the password is too easy to guess (about ${bits} bits; at least ${minBits}): make it longer or mix letters, digits and signs`;
  return null;
}
