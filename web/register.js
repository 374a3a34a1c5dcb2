// The registration page (the seed's Fig. 3a): personal information, user id, number (or one
// assigned from the gateway's range) and password. The SCRAM verifier is computed here;
// errors are shown next to the field at fault.
import { makeVerifier, passwordProblem } from "/scram.js";

const $ = (id) => document.getElementById(id);
const FIELDS = ["display_name", "email", "user", "number", "password", "invite"];
let params = null;

function clearErrors() {
  for (const f of FIELDS) $(`${f}-error`).textContent = "";
  $("form-error").textContent = "";
}

function showError(field, message) {
  const el = field && $(`${field}-error`) ? $(`${field}-error`) : $("form-error");
  el.textContent = message;
  if (field && $(field)) $(field).setAttribute("aria-invalid", "true");
}

async function load() {
  const r = await fetch("/api/v1/register");
  params = await r.json();
  const mode = params.registration;
  $("mode").textContent = {
    open: "Registration is open.",
    invite: "Registration needs an invitation code.",
    closed: "Registration is closed.",
  }[mode];
  $("invite-row").hidden = mode !== "invite";
  $("submit").disabled = mode === "closed";
  if (params.number_range) {
    $("assign-row").hidden = false;
    $("range").textContent = `(from ${params.number_range})`;
    $("assign").addEventListener("change", () => {
      $("number").disabled = $("assign").checked;
    });
  }
  document.body.dataset.ready = "1";
}

async function submit(ev) {
  ev.preventDefault();
  clearErrors();
  $("result").textContent = "";
  $("result").className = "";
  const user = $("user").value;
  const password = $("password").value;
  const weak = passwordProblem(password, user, params.min_password_chars, params.min_password_bits);
  if (weak) {
    showError("password", weak);
    return;
  }
  $("submit").disabled = true;
  try {
    const verifier = await makeVerifier(password, params.salt, params.iterations);
    const body = {
      user,
      number: $("assign").checked ? "" : $("number").value,
      display_name: $("display_name").value,
      email: $("email").value,
      verifier,
    };
    if (params.registration === "invite") body.invite = $("invite").value;
    const r = await fetch("/api/v1/register", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await r.json();
    if (r.ok) {
      $("result").className = "ok";
      $("result").textContent = `Registered ${answer.user} with number ${answer.number}.`;
      $("register").reset();
      // A fresh salt for the next registration from this page.
      params = await (await fetch("/api/v1/register")).json();
    } else {
      showError(answer.field, answer.message);
    }
  } catch (e) {
    showError(null, `registration failed: ${e}`);
  } finally {
    $("submit").disabled = params.registration === "closed";
  }
}

$("register").addEventListener("submit", submit);
load().catch((e) => showError(null, `cannot reach the gateway: ${e}`));
