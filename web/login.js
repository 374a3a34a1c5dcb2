// The log-in and dial page (the seed's Fig. 3b): SCRAM-SHA-256 log-in computed in the page,
// the control protocol (docs/PROTOCOL.md) over a WebSocket, heart-beats, and call signalling.
import { b64, unb64, saltedPassword } from "/scram.js";
import { Phone, sessionKey } from "/phone.js";

const $ = (id) => document.getElementById(id);
const enc = new TextEncoder();
let ws = null;
let beat = null;
let seq = 0;
let call = null;
let tag = 0;
let incoming = null;
let phone = null;
let me = null;
let online = new Set();

// Contacts: numbers kept in this browser (localStorage, per user); who of them is online comes
// from the gateway (`presence_query`, asked at every heart-beat), i.e. from their heart-beats.
const MAX_CONTACTS = 32;
const contactsKey = () => `voxgate-contacts-${me}`;
function contacts() {
  try {
    const v = JSON.parse(localStorage.getItem(contactsKey()) || "[]");
    return Array.isArray(v) ? v.filter((n) => typeof n === "string").slice(0, MAX_CONTACTS) : [];
  } catch {
    return [];
  }
}

function showContacts() {
  const ul = $("contacts");
  ul.replaceChildren();
  for (const n of contacts()) {
    const li = document.createElement("li");
    li.dataset.number = n;
    const state = online.has(n) ? "online" : "offline";
    li.className = state;
    const name = document.createElement("button");
    name.textContent = n;
    name.title = "put this number in the number field";
    name.addEventListener("click", () => {
      $("number").value = n;
    });
    const s = document.createElement("span");
    s.className = "presence";
    s.textContent = state;
    const del = document.createElement("button");
    del.textContent = "remove";
    del.addEventListener("click", () => {
      localStorage.setItem(contactsKey(), JSON.stringify(contacts().filter((x) => x !== n)));
      showContacts();
    });
    li.append(name, " ", s, " ", del);
    ul.append(li);
  }
}

function askPresence() {
  const numbers = contacts();
  if (numbers.length > 0 && ws && ws.readyState === WebSocket.OPEN) send({ type: "presence_query", numbers });
}

async function hmac(key, data) {
  const k = await crypto.subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return new Uint8Array(await crypto.subtle.sign("HMAC", k, typeof data === "string" ? enc.encode(data) : data));
}

const saslname = (u) => u.replaceAll("=", "=3D").replaceAll(",", "=2C");

function send(msg) {
  ws.send(JSON.stringify(msg));
}

function show(field, text) {
  $(`${field}-error`).textContent = text;
}

function clearErrors() {
  for (const f of ["user", "password", "form"]) show(f, "");
}

function setCall(text) {
  $("call-status").textContent = text;
}

// RFC 5802 client side; resolves with the welcome message.
function login(user, password) {
  return new Promise((resolve, reject) => {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/control`;
    ws = new WebSocket(url);
    const nonceBytes = crypto.getRandomValues(new Uint8Array(18));
    const cnonce = b64(nonceBytes).replaceAll("+", "-").replaceAll("/", "_");
    let auth = null;
    let serverKey = null;
    let storedKey = null;
    ws.onopen = () => send({ type: "hello", version: 1, user, nonce: cnonce, software: "voxgate web page" });
    ws.onerror = () => reject(new Error("cannot reach the gateway"));
    ws.onclose = () => {
      clearInterval(beat);
      if (!$("phone").hidden) {
        $("status").textContent = "Disconnected.";
      }
      reject(new Error("the gateway closed the connection"));
    };
    ws.onmessage = async (ev) => {
      const m = JSON.parse(ev.data);
      try {
        if (m.type === "challenge") {
          if (!m.nonce.startsWith(cnonce)) throw new Error("the gateway's nonce does not extend ours");
          const salted = await saltedPassword(password, unb64(m.salt), m.iterations);
          const clientKey = await hmac(salted, "Client Key");
          storedKey = new Uint8Array(await crypto.subtle.digest("SHA-256", clientKey));
          auth = `n=${saslname(user)},r=${cnonce},r=${m.nonce},s=${m.salt},i=${m.iterations},c=biws,r=${m.nonce}`;
          const clientSig = await hmac(storedKey, auth);
          const proof = clientKey.map((b, i) => b ^ clientSig[i]);
          serverKey = await hmac(salted, "Server Key");
          send({ type: "proof", channel_binding: "biws", nonce: m.nonce, proof: b64(proof) });
        } else if (m.type === "welcome") {
          const expected = b64(await hmac(serverKey, auth));
          if (expected !== m.signature) {
            ws.close();
            throw new Error("the gateway could not prove it knows your verifier");
          }
          // The session key (never sent) keys the media leg's binding.
          phone = new Phone(await sessionKey(storedKey, auth), (t) => {
            $("media-status").textContent = t;
          });
          resolve(m);
        } else if (m.type === "refused") {
          reject(Object.assign(new Error(m.message), { code: m.code }));
        } else {
          onMessage(m);
        }
      } catch (e) {
        reject(e);
      }
    };
  });
}

function onMessage(m) {
  switch (m.type) {
    case "poll":
      send({ type: "heartbeat", seq: ++seq });
      break;
    case "presence":
      online = new Set(m.online);
      showContacts();
      break;
    case "probe_result":
      // A page has no UDP: the probe finds none, so its own segments are TCP both ways.
      window.voxgateCapabilities = m.capabilities;
      break;
    case "calling":
      call = m.call;
      $("hangup").disabled = false;
      setCall(`Calling (call ${m.call})…`);
      break;
    case "ringing":
      setCall("Ringing…");
      break;
    case "incoming":
      if (call !== null || incoming !== null) {
        send({ type: "reject", call: m.call });
        break;
      }
      incoming = m.call;
      $("answer").disabled = false;
      $("hangup").disabled = false;
      setCall(`Incoming call from ${m.from_number}.`);
      break;
    case "media":
      // The test hook shows the plan and addresses the gateway chose for this page.
      window.voxgateMedia = m;
      setCall("Connected.");
      phone.media(m);
      break;
    case "media_ready":
      phone.ready(m.call);
      break;
    case "hang_up":
      if (m.call === incoming) {
        incoming = null;
        $("answer").disabled = true;
      }
      if (m.call === call) {
        call = null;
        phone.stopMedia();
      }
      $("hangup").disabled = call === null && incoming === null;
      setCall(`Call ended: ${m.reason}${m.detail ? ` (${m.detail})` : ""}`);
      break;
    case "error":
      setCall(`Error: ${m.message}`);
      break;
    default:
      break;
  }
}

$("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  clearErrors();
  const user = $("user").value;
  const password = $("password").value;
  if (!user) return show("user", "enter your user id");
  if (!password) return show("password", "enter your password");
  $("login-button").disabled = true;
  try {
    const w = await login(user, password);
    $("login").hidden = true;
    $("phone").hidden = false;
    $("status").textContent = `Logged in as ${w.user}, number ${w.number}. Online.`;
    me = w.user;
    showContacts();
    askPresence();
    beat = setInterval(() => {
      send({ type: "heartbeat", seq: ++seq });
      askPresence();
    }, w.heartbeat_ms);
  } catch (e) {
    if (e.code === "auth_failed") show("password", e.message);
    else show("form", e.message);
  } finally {
    $("login-button").disabled = false;
  }
});

// Opens the microphone (browsers allow audio only after a click); false when it cannot.
async function audio() {
  try {
    await phone.prepare();
    return true;
  } catch (e) {
    setCall(`No audio: ${e.message}`);
    return false;
  }
}

$("call").addEventListener("click", async () => {
  const number = $("number").value.trim();
  if (!number) return setCall("enter a number");
  if (!(await audio())) return;
  send({ type: "dial", tag: ++tag, number });
  setCall("Dialling…");
});

$("answer").addEventListener("click", async () => {
  if (incoming === null) return;
  const c = incoming;
  incoming = null;
  $("answer").disabled = true;
  if (!(await audio())) {
    send({ type: "reject", call: c });
    return;
  }
  call = c;
  send({ type: "accept", call: c });
  setCall("Answered.");
});

$("hangup").addEventListener("click", () => {
  if (incoming !== null) {
    send({ type: "reject", call: incoming });
    incoming = null;
    $("answer").disabled = true;
    setCall("Rejected.");
  } else if (call !== null) send({ type: "hang_up", call });
});

$("add-contact").addEventListener("click", () => {
  const n = $("contact").value.trim();
  $("contact-error").textContent = "";
  if (!/^\+?[0-9]{1,20}$/.test(n)) {
    $("contact-error").textContent = "a number is digits, optionally after a +";
    return;
  }
  const list = contacts();
  if (list.includes(n)) return;
  if (list.length >= MAX_CONTACTS) {
    $("contact-error").textContent = `at most ${MAX_CONTACTS} contacts`;
    return;
  }
  localStorage.setItem(contactsKey(), JSON.stringify([...list, n]));
  $("contact").value = "";
  showContacts();
  askPresence();
});

$("logout").addEventListener("click", () => {
  send({ type: "bye" });
  ws.close();
});
