//! The web listener: the admin REST API (against the CLI's validation and texts, and the
//! OpenAPI file), and the registration page in a real headless Chromium driven by WebDriver.
//!
//! The browser tests need Debian's `chromium` and `chromium-driver`; scripts/test-all installs
//! them. Without them the browser test says so loudly, and fails under CI=true.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Gateway, free_port, need_tool, run_with_stdin};
use serde_json::{Value, json};

const TOKEN: &str = "test-token-0123456789abcdef";

/// One HTTP/1.1 request (`Connection: close`): the status and the body.
fn http(
    method: &str,
    addr: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    http_on(&mut s, true, method, addr, path, auth, body)
}

/// One HTTP/1.1 request on an open connection (`close`: ask the server to close it after the
/// answer; otherwise it stays open for the next): the status and the body.
fn http_on(
    s: &mut (impl Read + Write),
    close: bool,
    method: &str,
    addr: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> (u16, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let connection = if close { "close" } else { "keep-alive" };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    if let Some(t) = auth {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    // Read the head, then exactly the body (chromedriver keeps connections open).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let have = buf.len() - head_end;
        let done = match length {
            Some(l) => have >= l,
            None if chunked => buf.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = s.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let rest = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    let body = if chunked { dechunk(&rest) } else { rest };
    (code, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A gateway with the web listener on an ephemeral loopback port; its address.
fn gateway_with_web(web: &str) -> (Gateway, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("voxgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[web]\nenabled = true\nlisten = \"127.0.0.1:0\"\nadmin_tokens = [\"{TOKEN}\"]\n{web}\n"
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    // The ready line reaches the kept log just after Gateway::start sees it.
    gw.wait_log(0, "the ready line", |l| l.contains("voxgate is ready"));
    let log = gw.log_text();
    let ready = log
        .lines()
        .find(|l| l.contains("voxgate is ready"))
        .expect("ready line");
    let addr = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("web="))
        .filter(|a| *a != "off")
        .unwrap_or_else(|| panic!("the ready line names the web listener: {ready}"))
        .to_owned();
    // The listener is the one this gateway started: its page and its API answer.
    let (code, page) = http("GET", &addr, "/", None, None);
    assert_eq!(code, 200);
    assert!(page.contains("Register with voxgate"), "{page}");
    (gw, addr, dir)
}

fn probe(gw: &Gateway, user: &str, pw: &str) -> std::process::Output {
    run_with_stdin(
        Command::new(BIN).args([
            "probe",
            "--server",
            &gw.control,
            "--user",
            user,
            "--password-stdin",
        ]),
        &format!("{pw}\n"),
    )
}

/// What `voxgate user add` prints on stderr for this input (the CLI's text).
fn cli_user_add_error(gw: &Gateway, user: &str, number: &str) -> String {
    let out = run_with_stdin(
        Command::new(BIN).args([
            "user",
            "add",
            user,
            "--number",
            number,
            "--password-stdin",
            "--data-dir",
            gw.dir.path().join("data").to_str().unwrap(),
        ]),
        "long-enough-password\n",
    );
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// (method, path) of every operation in docs/openapi.yaml.
fn openapi_operations() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.yaml"))
            .unwrap();
    let mut ops = Vec::new();
    let mut in_paths = false;
    let mut path = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end_matches(':')));
        } else if let Some(m) = line.strip_prefix("    ")
            && !m.starts_with(' ')
            && let Some(m) = m.strip_suffix(':')
            && ["get", "post", "put", "delete", "patch"].contains(&m)
        {
            ops.push((
                m.to_uppercase(),
                path.clone().expect("a path before its methods"),
            ));
        }
    }
    ops.sort();
    ops
}

#[test]
fn the_openapi_file_documents_exactly_the_api_the_server_serves() {
    let documented = openapi_operations();
    let mut served: Vec<(String, String)> = voxgate::server::web::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    served.sort();
    assert_eq!(
        documented, served,
        "docs/openapi.yaml and server::web::ROUTES differ"
    );
    // And the running server really serves each of them (and nothing else under /api/).
    let (_gw, addr, _dir) = gateway_with_web("registration = \"open\"");
    for (m, p) in &documented {
        let p = p.replace("{user}", "nobody").replace("{prefix}", "%2B99");
        let (code, body) = http(m, &addr, &p, None, Some(&json!({})));
        assert!(code != 404 && code != 405, "{m} {p}: {code} {body}");
    }
    for (m, p) in [
        ("PUT", "/api/v1/subscribers"),
        ("GET", "/api/v1/users"),
        ("GET", "/api/v2/routes"),
    ] {
        let (code, _) = http(m, &addr, p, Some(TOKEN), None);
        assert!(code == 404 || code == 405, "{m} {p} is not served: {code}");
    }
}

#[test]
fn the_admin_api_needs_a_token_and_validates_like_the_cli() {
    let (gw, addr, _dir) = gateway_with_web("");
    // No token, a wrong one, a truncated one: 401, and nothing is listed.
    for auth in [
        None,
        Some("wrong-token-0123456789abcdef"),
        Some(&TOKEN[..TOKEN.len() - 1]),
    ] {
        let (code, body) = http("GET", &addr, "/api/v1/subscribers", auth, None);
        assert_eq!(code, 401, "{auth:?}: {body}");
        assert!(!body.contains("alice"), "{body}");
        let (code, _) = http(
            "POST",
            &addr,
            "/api/v1/subscribers",
            auth,
            Some(&json!({"user": "eve", "number": "+15550666", "password": "long-enough-pw"})),
        );
        assert_eq!(code, 401);
    }
    let (code, body) = http("GET", &addr, "/api/v1/subscribers", Some(TOKEN), None);
    assert_eq!(code, 200, "{body}");
    let users: Vec<String> = json_of(&body)
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(users, ["alice", "bob", "carol"]);
    assert!(
        !body.contains("stored_key") && !body.contains("salt"),
        "no secrets listed: {body}"
    );

    // The CLI's errors, the CLI's texts, the field at fault.
    for (user, number, field) in [
        ("alice", "+15559999", "user"),
        ("dave", "+15550001", "number"),
        ("da ve", "+15559999", "user"),
        ("dave", "+0123", "number"),
    ] {
        let (code, body) = http(
            "POST",
            &addr,
            "/api/v1/subscribers",
            Some(TOKEN),
            Some(&json!({"user": user, "number": number, "password": "long-enough-password"})),
        );
        let v = json_of(&body);
        assert!(code == 409 || code == 422, "{user} {number}: {code} {body}");
        assert_eq!(v["field"], field, "{body}");
        let cli = cli_user_add_error(&gw, user, number);
        assert!(
            cli.contains(v["message"].as_str().unwrap()),
            "the CLI says {cli:?}, the API {body}"
        );
    }
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/subscribers",
        Some(TOKEN),
        Some(&json!({"user": "dave", "number": "+15550004", "password": "short"})),
    );
    assert_eq!(code, 422);
    assert_eq!(
        json_of(&body)["message"],
        "the password must have at least 8 characters"
    );
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/subscribers",
        Some(TOKEN),
        Some(
            &json!({"user": "dave", "number": "+15550004", "verifier": {"salt": "AAAA", "iterations": 1, "stored_key": "AAAA", "server_key": "AAAA"}}),
        ),
    );
    assert_eq!(code, 422, "{body}");
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("iterations"),
        "too few iterations refused: {body}"
    );
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/subscribers",
        Some(TOKEN),
        Some(
            &json!({"user": "dave", "number": "+15550004", "password": "dave-password-1", "extra": 1}),
        ),
    );
    assert_eq!(code, 400, "unknown fields refused: {body}");

    // A class of service the CLI would refuse is refused, naming the field.
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/subscribers",
        Some(TOKEN),
        Some(
            &json!({"user": "dave", "number": "+15550004", "password": "dave-password-1",
                     "allow_prefixes": ["+49x"]}),
        ),
    );
    assert_eq!(
        (code, json_of(&body)["field"].as_str()),
        (422, Some("allow_prefixes")),
        "{body}"
    );

    // Added through the API, with a class of service: dave logs in with that password.
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/subscribers",
        Some(TOKEN),
        Some(
            &json!({"user": "dave", "number": "+15550004", "password": "dave-password-1",
                     "allow_prefixes": ["+4930"]}),
        ),
    );
    assert_eq!(code, 201, "{body}");
    let (_, body) = http("GET", &addr, "/api/v1/subscribers", Some(TOKEN), None);
    let listed = json_of(&body);
    let dave = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "dave")
        .unwrap();
    assert_eq!(dave["allow_prefixes"], json!(["+4930"]));
    let out = probe(&gw, "dave", "dave-password-1");
    assert!(
        out.status.success(),
        "dave logs in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, _) = http(
        "DELETE",
        &addr,
        "/api/v1/subscribers/dave",
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 204);
    let (code, body) = http(
        "DELETE",
        &addr,
        "/api/v1/subscribers/dave",
        Some(TOKEN),
        None,
    );
    assert_eq!(
        (code, json_of(&body)["message"].as_str().unwrap()),
        (404, "no user \"dave\"")
    );
    let out = probe(&gw, "dave", "dave-password-1");
    assert!(!out.status.success(), "dave is gone");

    // Routes.
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/routes",
        Some(TOKEN),
        Some(
            &json!({"prefix": "+4930", "media_addr": "192.0.2.10:20000", "description": "Berlin"}),
        ),
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/routes",
        Some(TOKEN),
        Some(&json!({"prefix": "+4930", "media_addr": "192.0.2.11:20000"})),
    );
    assert_eq!(
        (code, json_of(&body)["field"].as_str().unwrap()),
        (409, "prefix"),
        "{body}"
    );
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/routes",
        Some(TOKEN),
        Some(&json!({"prefix": "49x", "media_addr": "192.0.2.11:20000"})),
    );
    assert_eq!(
        (code, json_of(&body)["field"].as_str().unwrap()),
        (422, "prefix"),
        "{body}"
    );
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/routes",
        Some(TOKEN),
        Some(&json!({"prefix": "+44", "media_addr": "nowhere"})),
    );
    assert_eq!(
        (code, json_of(&body)["field"].as_str().unwrap()),
        (422, "media_addr"),
        "{body}"
    );
    let (code, body) = http("GET", &addr, "/api/v1/routes", Some(TOKEN), None);
    assert_eq!(code, 200);
    assert_eq!(
        json_of(&body),
        json!([{"prefix": "+4930", "media_addr": "192.0.2.10:20000", "description": "Berlin", "ports": 1}])
    );
    let (code, _) = http("DELETE", &addr, "/api/v1/routes/%2B4930", Some(TOKEN), None);
    assert_eq!(code, 204);
    let (_, body) = http("GET", &addr, "/api/v1/routes", Some(TOKEN), None);
    assert_eq!(json_of(&body), json!([]));

    // A body larger than the bound is refused before it is parsed.
    let big = json!({"user": "x".repeat(20_000), "number": "+1", "password": "x"});
    let (code, _) = http(
        "POST",
        &addr,
        "/api/v1/subscribers",
        Some(TOKEN),
        Some(&big),
    );
    assert_eq!(code, 413);
}

#[test]
fn closed_registration_is_refused() {
    let (_gw, addr, _dir) = gateway_with_web("registration = \"closed\"");
    let (code, body) = http("GET", &addr, "/api/v1/register", None, None);
    assert_eq!(json_of(&body)["registration"], "closed", "{code} {body}");
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/register",
        None,
        Some(
            &json!({"user": "eve", "number": "+15550666", "verifier": {"salt": "AAAA", "iterations": 4096, "stored_key": "AAAA", "server_key": "AAAA"}}),
        ),
    );
    assert_eq!(code, 403, "{body}");
    assert_eq!(json_of(&body)["message"], "registration is closed");
}

#[test]
fn invitation_codes_cannot_be_guessed_at_speed() {
    let (gw, addr, _dir) = gateway_with_web("registration = \"invite\"");
    let data = gw.dir.path().join("data");
    let out = Command::new(BIN)
        .args([
            "invite",
            "add",
            "real-code",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["invite", "list", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "real-code\t1\n");
    let req = |code: &str| {
        json!({"user": "mallory", "number": "+15550666", "invite": code,
               "verifier": {"salt": "c2FsdHNhbHQ=", "iterations": 4096,
                            "stored_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                            "server_key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}})
    };
    let limit = voxgate::server::web::limit::ATTEMPTS;
    for i in 0..limit {
        let (code, body) = http(
            "POST",
            &addr,
            "/api/v1/register",
            None,
            Some(&req(&format!("guess-{i}"))),
        );
        assert_eq!(code, 403, "{body}");
        assert_eq!(json_of(&body)["field"], "invite");
    }
    // The guesser is out of attempts: even the right code is refused now, and nothing is
    // registered or used up.
    let (code, body) = http(
        "POST",
        &addr,
        "/api/v1/register",
        None,
        Some(&req("real-code")),
    );
    assert_eq!(code, 429, "{body}");
    assert!(
        json_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("too many registration attempts")
    );
    let (_, body) = http("GET", &addr, "/api/v1/subscribers", Some(TOKEN), None);
    assert!(!body.contains("mallory"), "{body}");
    let out = Command::new(BIN)
        .args(["invite", "list", "--data-dir", data.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "real-code\t1\n");
    // The operator's API is not limited by the page's counter.
    let (code, _) = http("GET", &addr, "/api/v1/routes", Some(TOKEN), None);
    assert_eq!(code, 200);
}

#[test]
fn the_web_listener_holds_at_most_max_connections() {
    let (_gw, addr, _dir) = gateway_with_web("max_connections = 2");
    // Two idle connections (a slow client sends nothing) hold both places.
    let idle1 = std::net::TcpStream::connect(&addr).unwrap();
    let _idle2 = std::net::TcpStream::connect(&addr).unwrap();
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        third,
        "GET /style.css HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buf = [0u8; 12];
    let waited = third.read(&mut buf);
    assert!(
        matches!(&waited, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the third connection is not served while two are held: {waited:?}"
    );
    // One place frees: the waiting request is served.
    drop(idle1);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    third.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
}

#[test]
fn idle_web_connections_are_closed() {
    let (_gw, addr, _dir) = gateway_with_web("idle_timeout_s = 1");
    // A client that connects and sends nothing (or half a request) is closed after the idle
    // time-out, giving its place back.
    let t0 = Instant::now();
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    let mut half = std::net::TcpStream::connect(&addr).unwrap();
    write!(half, "GET / HTTP/1.1\r\nHost: ").unwrap();
    for s in [&mut silent, &mut half] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        assert!(
            r.is_ok() || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "closed by the gateway, not by our read time-out: {r:?}"
        );
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // A plain request is still served.
    let (code, _) = http("GET", &addr, "/style.css", None, None);
    assert_eq!(code, 200);
}

// ---- The registration page in headless Chromium, over WebDriver. ----

/// A chromedriver process and one browser session; both end when this drops.
struct Browser {
    _driver: Driver,
    addr: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Option<Browser> {
        Browser::start_with(&[])
    }

    /// A browser with extra command-line arguments (e.g. the fake audio capture).
    fn start_with(extra: &[String]) -> Option<Browser> {
        let chromium = need_tool("chromium", "chromium")?;
        let driver_bin = need_tool("chromedriver", "chromium-driver")?;
        let port = free_port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Driver)
            .expect("start chromedriver");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                // A chromedriver still starting may accept and then reset the connection
                // (seen in CI): that is "not ready yet", not a failure.
                let status = std::panic::catch_unwind(|| http("GET", &addr, "/status", None, None));
                // The server on the port is chromedriver (it says so), not something else.
                if let Ok((code, body)) = status
                    && code == 200
                    && json_of(&body)["value"]["ready"] == true
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=900,1100",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.extend_from_slice(extra);
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": chromium,
            "args": args,
        }}}});
        let (code, body) = http("POST", &addr, "/session", None, Some(&caps));
        assert_eq!(code, 200, "new session: {body}");
        let session = json_of(&body)["value"]["sessionId"]
            .as_str()
            .unwrap()
            .to_owned();
        Some(Browser {
            _driver: driver,
            addr,
            session,
            _profile: profile,
        })
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (code, text) = http(
            method,
            &self.addr,
            &format!("/session/{}{path}", self.session),
            None,
            body.as_ref(),
        );
        assert_eq!(code, 200, "{method} {path}: {text}");
        json_of(&text)["value"].clone()
    }

    fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url})));
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    fn element(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Clears the field and types `text` into it, as a user would.
    fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.cmd("POST", &format!("/element/{e}/clear"), Some(json!({})));
        if !text.is_empty() {
            self.cmd(
                "POST",
                &format!("/element/{e}/value"),
                Some(json!({"text": text})),
            );
        }
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    fn text(&self, css: &str) -> String {
        let e = self.element(css);
        self.cmd("GET", &format!("/element/{e}/text"), None)
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Waits until `f` gives `Some`.
    fn wait<T>(&self, what: &str, f: impl Fn() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(self.cmd("GET", "/screenshot", None).as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/web-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            "DELETE",
            &self.addr,
            &format!("/session/{}", self.session),
            None,
            None,
        );
        // Then `driver` drops and kills chromedriver.
    }
}

/// Kills chromedriver when dropped (also when no session could be made).
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fills the form and submits it; waits until the page shows an outcome.
fn submit(b: &Browser, user: &str, number: Option<&str>, password: &str, invite: &str) {
    b.js("document.getElementById('result').textContent = ''; for (const e of document.querySelectorAll('.error')) e.textContent = '';");
    b.type_into("#display_name", "Dave Bowman");
    b.type_into("#email", "dave@example.org");
    b.type_into("#user", user);
    let assigned = b
        .js("return document.getElementById('assign').checked")
        .as_bool()
        .unwrap();
    if assigned != number.is_none() {
        b.click("#assign");
    }
    if let Some(n) = number {
        b.type_into("#number", n);
    }
    b.type_into("#password", password);
    b.type_into("#invite", invite);
    b.click("#submit");
    b.wait("an outcome on the page", || {
        let shown = b.js("return [...document.querySelectorAll('.error, #result')].map(e => e.textContent).join('')");
        (!shown.as_str().unwrap_or("").is_empty()).then_some(())
    });
}

/// The first browser test, as one flow: a new subscriber registers through the page
/// (Fig. 3a; the errors are shown next to their fields on the way), logs in through the log-in
/// page (Fig. 3b) with the password typed at registration, and calls bob, a `voxgate phone
/// --answer --record`, with Chromium's fake microphone playing `speech-8k.wav`: bob's
/// recording is the source audio after one G.711 round trip, and the plan is exactly Table 1's
/// for a page (no UDP) calling an open phone ([`page_calls_bob_with_audio`]).
#[test]
fn a_subscriber_registers_in_a_real_browser_logs_in_and_calls() {
    let Some(b) = Browser::start_with(&fake_microphone()) else {
        return;
    };
    let (gw, addr, dir) =
        gateway_with_web("registration = \"invite\"\nnumber_range = \"+1555010000-+1555019999\"");
    let data = gw.dir.path().join("data");
    let out = Command::new(BIN)
        .args([
            "invite",
            "add",
            "welcome-2026",
            "--uses",
            "1",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    b.go(&format!("http://{addr}/"));
    b.wait("the page to load its parameters", || {
        (b.js("return document.body.dataset.ready || ''") == "1").then_some(())
    });
    assert!(b.text("#mode").contains("invitation code"));
    let empty = b.screenshot("register");
    // Every request the page makes from here is recorded (method, then body).
    b.js("window.sent = []; const f = window.fetch; \
          window.fetch = (u, o) => { \
            window.sent.push(((o && o.method) || 'GET') + ' ' + String((o && o.body) || '')); \
            return f(u, o); };");
    let posts = || {
        b.js("return window.sent.filter(r => r.startsWith('POST')).length")
            .as_u64()
            .unwrap()
    };

    // A weak password is refused in the page, next to the password field; nothing is sent.
    submit(&b, "dave", None, "password1", "welcome-2026");
    assert!(
        b.text("#password-error").contains("well-known"),
        "{}",
        b.text("#password-error")
    );
    submit(&b, "dave", None, "aaaaaaaaaaaa", "welcome-2026");
    assert!(
        b.text("#password-error").contains("too easy to guess"),
        "{}",
        b.text("#password-error")
    );
    submit(&b, "dave", None, "Sh0rt!", "welcome-2026");
    assert!(b.text("#password-error").contains("at least 8 characters"));
    assert_eq!(b.text("#user-error"), "");
    assert_eq!(posts(), 0, "a refused password sent a registration");

    // A wrong invitation code: next to the code field.
    submit(
        &b,
        "dave",
        None,
        "Open the pod bay doors, HAL 9000",
        "not-a-code",
    );
    assert_eq!(
        b.text("#invite-error"),
        "unknown or used-up invitation code"
    );
    assert_eq!(b.text("#password-error"), "");
    assert_eq!(posts(), 1, "the gateway refused this one");

    // A taken user id: the CLI's text, next to the user id field; the code's use is given back.
    submit(
        &b,
        "alice",
        None,
        "Open the pod bay doors, HAL 9000",
        "welcome-2026",
    );
    let cli = cli_user_add_error(&gw, "alice", "+15559999");
    let shown = b.text("#user-error");
    assert_eq!(shown, "user \"alice\" already exists");
    assert!(cli.contains(&shown), "the CLI says {cli:?}");
    // A taken number, typed in: next to the number field.
    submit(
        &b,
        "dave",
        Some("+15550002"),
        "Open the pod bay doors, HAL 9000",
        "welcome-2026",
    );
    assert!(
        b.text("#number-error").contains("already registered"),
        "{}",
        b.text("#number-error")
    );
    let errors = b.screenshot("register-errors");

    // Registered with an assigned number: the page says which. The password is in none of the
    // page's requests, the verifier is.
    b.js("window.sent = []");
    submit(
        &b,
        "dave",
        None,
        "Open the pod bay doors, HAL 9000",
        "welcome-2026",
    );
    assert_eq!(
        b.text("#result"),
        "Registered dave with number +1555010000."
    );
    let done = b.screenshot("register-done");
    let sent = b.js("return window.sent.join('\\n')");
    let sent = sent.as_str().unwrap();
    assert!(
        sent.contains("stored_key") && sent.contains("\"dave\""),
        "{sent}"
    );
    assert!(
        !sent.contains("pod bay"),
        "the password left the page: {sent}"
    );

    // The verifier the page computed is right: dave logs in with voxgate probe.
    let out = probe(&gw, "dave", "Open the pod bay doors, HAL 9000");
    assert!(
        out.status.success(),
        "dave logs in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = probe(&gw, "dave", "Open the pod bay doors, HAL 9001");
    assert!(!out.status.success(), "a wrong password is refused");
    // The personal information is kept; the single-use code is used up.
    let (_, body) = http("GET", &addr, "/api/v1/subscribers", Some(TOKEN), None);
    let dave = json_of(&body)
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "dave")
        .cloned()
        .unwrap();
    assert_eq!(
        (
            dave["display_name"].as_str(),
            dave["email"].as_str(),
            dave["number"].as_str()
        ),
        (
            Some("Dave Bowman"),
            Some("dave@example.org"),
            Some("+1555010000")
        )
    );
    submit(
        &b,
        "frank",
        None,
        "Open the pod bay doors, HAL 9000",
        "welcome-2026",
    );
    assert_eq!(
        b.text("#invite-error"),
        "unknown or used-up invitation code"
    );

    // dave logs in through the log-in page and calls bob: his voice reaches bob's recording.
    let mark = gw.log_len();
    let welcome = log_in_with(&b, &addr, "dave", "Open the pod bay doors, HAL 9000");
    assert_eq!(welcome, "Logged in as dave, number +1555010000. Online.");
    gw.wait_online(mark, "dave");
    page_calls_bob_with_audio(&b, &gw, dir.path(), "+1555010000", None);

    // The README shows these.
    update_readme_screenshots(&[empty, errors, done]);
}

#[test]
fn a_subscriber_logs_in_through_the_page_and_dials() {
    // A (fake) microphone: the page opens it before it dials.
    let Some(b) = Browser::start_with(&[
        "--use-fake-ui-for-media-stream".into(),
        "--use-fake-device-for-media-stream".into(),
    ]) else {
        return;
    };
    let (gw, addr, _dir) = gateway_with_web("");
    // Another site's page may not open a control connection in its visitor's name.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "GET /control HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://evil.example\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 403", "cross-origin upgrade refused");

    b.go(&format!("http://{addr}/login"));
    let login = b.screenshot("login");
    // Bad input over the WebSocket gets what a TCP client gets: an oversized message closes
    // the connection; a malformed one is answered with the reason, then closed.
    let attack = |payload: &str| {
        let script = format!(
            "const done = arguments[0]; const got = []; \
             const ws = new WebSocket(`ws://${{location.host}}/control`); \
             ws.onopen = () => ws.send({payload}); \
             ws.onmessage = (e) => got.push(e.data); \
             ws.onclose = () => done('closed ' + got.join(' ')); \
             setTimeout(() => done('still open'), 8000);"
        );
        b.cmd(
            "POST",
            "/execute/async",
            Some(json!({"script": script, "args": []})),
        )
        .as_str()
        .unwrap()
        .to_owned()
    };
    let big = attack("'x'.repeat(9000)");
    assert!(big.starts_with("closed"), "{big}");
    let bad = attack("'{\"type\":\"hello\",\"version\":\"one\"}'");
    assert!(
        bad.starts_with("closed") && bad.contains("bad_message"),
        "{bad}"
    );
    // A wrong password: the gateway's refusal, next to the password field.
    b.type_into("#user", "alice");
    b.type_into("#password", "not-alices-password");
    b.click("#login-button");
    let shown = b.wait("the refusal", || {
        let t = b.text("#password-error");
        (!t.is_empty()).then_some(t)
    });
    assert!(shown.contains("wrong user or password"), "{shown}");
    // And the page is not logged in: no phone, the log-in form still there.
    assert_eq!(
        b.js("return [document.getElementById('phone').hidden, document.getElementById('login').hidden]"),
        json!([true, false])
    );
    // The right one: logged in over the WebSocket with SCRAM computed in the page; the
    // gateway checked the proof and the page checked the gateway's signature.
    let mark = gw.log_len();
    b.type_into("#password", &common::password("alice"));
    b.click("#login-button");
    let status = b.wait("the welcome", || {
        let t = b.text("#status");
        (!t.is_empty()).then_some(t)
    });
    assert_eq!(status, "Logged in as alice, number +15550001. Online.");
    gw.wait_online(mark, "alice");
    // Dial carol, who is offline: the gateway's answer is shown.
    b.type_into("#number", "+15550003");
    b.click("#call");
    let ended = b.wait("the call's end", || {
        let t = b.text("#call-status");
        t.starts_with("Call ended").then_some(t)
    });
    assert_eq!(ended, "Call ended: offline");
    // The gateway's record of that call says the same.
    let r = cdr_lines(&gw, 1)[0].clone();
    assert_eq!(
        (
            &r["caller"]["number"],
            &r["callee"]["number"],
            &r["reason"],
            &r["answered"]
        ),
        (
            &json!("+15550001"),
            &json!("+15550003"),
            &json!("offline"),
            &Value::Null
        ),
        "{r}"
    );
    // bob calls alice's number: the page rings (the gateway routed the call to the page's
    // session); alice rejects it and bob hears the rejection.
    let bob = common::spawn_phone(&gw, "bob", &["--call", "+15550001"]);
    let incoming = b.wait("the ring", || {
        let t = b.text("#call-status");
        t.starts_with("Incoming").then_some(t)
    });
    assert_eq!(incoming, "Incoming call from +15550002.");
    b.click("#hangup");
    let bob = common::finish(bob);
    assert!(
        format!("{} {}", bob.json, bob.stderr).contains("rejected"),
        "bob's phone: {} {}",
        bob.json,
        bob.stderr
    );
    let r = cdr_lines(&gw, 2)[1].clone();
    assert_eq!(
        (&r["caller"]["number"], &r["callee"]["user"], &r["reason"]),
        (&json!("+15550002"), &json!("alice"), &json!("rejected")),
        "{r}"
    );
    let phone = b.screenshot("login-done");
    update_readme_screenshots(&[login, phone]);
}

/// Contacts' presence in the page: alice adds bob and carol (kept in the browser); the page
/// asks the gateway at every heart-beat (2 s here) and shows bob online while his phone is
/// logged in, offline once it is gone; carol, never logged in, stays offline.
#[test]
fn the_page_shows_which_contacts_are_online() {
    let Some(b) = Browser::start() else { return };
    let (gw, addr, _dir) = gateway_with_web("[presence]\nheartbeat_ms = 2000\n");
    log_in(&b, &addr, "alice");
    let state = |n: &str| {
        b.js(&format!(
            "const li = document.querySelector('#contacts li[data-number=\"{n}\"]'); \
             return li ? li.querySelector('.presence').textContent : 'missing'"
        ))
        .as_str()
        .unwrap()
        .to_owned()
    };
    for n in ["+15550002", "+15550003"] {
        b.type_into("#contact", n);
        b.click("#add-contact");
    }
    b.type_into("#contact", "not a number");
    b.click("#add-contact");
    assert_eq!(
        b.text("#contact-error"),
        "a number is digits, optionally after a +"
    );
    b.wait("both listed, offline", || {
        (state("+15550002") == "offline" && state("+15550003") == "offline").then_some(())
    });
    // The refused entry is neither listed nor kept.
    let listed = || {
        b.js(
            "return [[...document.querySelectorAll('#contacts li')].map(li => li.dataset.number), \
                      JSON.parse(localStorage.getItem('voxgate-contacts-alice'))]",
        )
    };
    assert_eq!(
        listed(),
        json!([["+15550002", "+15550003"], ["+15550002", "+15550003"]])
    );
    let mark = gw.log_len();
    let bob = common::spawn_phone(&gw, "bob", &["--answer", "--duration", "30"]);
    gw.wait_online(mark, "bob");
    b.wait("bob online", || {
        (state("+15550002") == "online").then_some(())
    });
    assert_eq!(state("+15550003"), "offline");
    let shot = b.screenshot("login-contacts");
    drop(bob);
    b.wait("bob offline again", || {
        (state("+15550002") == "offline").then_some(())
    });
    // The list is kept in the browser: after a reload and a new log-in it is still there.
    log_in(&b, &addr, "alice");
    b.wait("the kept list", || {
        (state("+15550002") == "offline" && state("+15550003") == "offline").then_some(())
    });
    // A contact's number goes into the number field on a click; "remove" removes it, for good.
    // (The list is drawn again at every presence answer: each click finds its button and
    // clicks it in one step, so it cannot hit a replaced one.)
    let click = |css: &str| {
        b.js(&format!("document.querySelector('{css}').click()"));
    };
    click("#contacts li[data-number=\"+15550003\"] button:first-of-type");
    assert_eq!(
        b.js("return document.getElementById('number').value"),
        "+15550003"
    );
    click("#contacts li[data-number=\"+15550003\"] button:last-of-type");
    assert_eq!(listed(), json!([["+15550002"], ["+15550002"]]));
    log_in(&b, &addr, "alice");
    b.wait("the kept list", || {
        (state("+15550002") == "offline").then_some(())
    });
    assert_eq!(listed(), json!([["+15550002"], ["+15550002"]]));
    update_readme_screenshots(&[shot]);
}

/// Logs `user` (provisioned with `common::password`) in through the page.
fn log_in(b: &Browser, addr: &str, user: &str) {
    log_in_with(b, addr, user, &common::password(user));
}

/// Logs `user` in through the page with `password`; the page's welcome.
fn log_in_with(b: &Browser, addr: &str, user: &str, password: &str) -> String {
    b.go(&format!("http://{addr}/login"));
    b.type_into("#user", user);
    b.type_into("#password", password);
    b.click("#login-button");
    b.wait("the welcome", || {
        let t = b.text("#status");
        t.starts_with("Logged in").then_some(t)
    })
}

/// 16-bit samples from a test hook (a JavaScript array of numbers).
fn pcm(v: &Value) -> Vec<i16> {
    v.as_array()
        .expect("an array of samples")
        .iter()
        .map(|x| x.as_i64().unwrap() as i16)
        .collect()
}

/// Where `needle` occurs in `hay`, if anywhere.
fn find(hay: &[i16], needle: &[i16]) -> Option<usize> {
    (!needle.is_empty() && needle.len() <= hay.len())
        .then(|| hay.windows(needle.len()).position(|w| w == needle))
        .flatten()
}

/// The best normalised cross-correlation of `piece` against the looped `source`, over every
/// whole-sample lag.
fn best_correlation(piece: &[i16], source: &[i16]) -> f64 {
    let p: Vec<f64> = piece.iter().map(|&x| f64::from(x)).collect();
    let pe: f64 = p.iter().map(|x| x * x).sum::<f64>().sqrt();
    let n = source.len();
    (0..n)
        .map(|lag| {
            let (mut dot, mut se) = (0.0, 0.0);
            for (i, x) in p.iter().enumerate() {
                let s = f64::from(source[(lag + i) % n]);
                dot += x * s;
                se += s * s;
            }
            dot / (pe * se.sqrt()).max(1.0)
        })
        .fold(f64::MIN, f64::max)
}

/// `tests/data/speech-8k.wav`: what Chromium's fake microphone plays in the call tests.
fn speech_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/speech-8k.wav")
}

/// Chromium's arguments for a page phone: a fake microphone playing [`speech_source`], no
/// permission prompt, audio that plays without a gesture.
fn fake_microphone() -> Vec<String> {
    vec![
        "--use-fake-ui-for-media-stream".into(),
        "--use-fake-device-for-media-stream".into(),
        format!(
            "--use-file-for-fake-audio-capture={}",
            speech_source().display()
        ),
        "--autoplay-policy=no-user-gesture-required".into(),
    ]
}

/// The plan for a page calling an open `voxgate phone`, (forward, backward). The page is, to
/// the planner, behind a firewall that blocks UDP both ways (its probe finds no UDP): Table 1's
/// case 12, `TCP both` calling `UDP both` (src/control/planner.rs). Forward, page to phone: the
/// page cannot send UDP, the phone can receive it: TCP in, UDP out. Backward, phone to page:
/// the phone can send UDP, the page cannot receive it: UDP in, TCP out.
const PAGE_CALLS_OPEN_PHONE: (&str, &str) = ("tcp_in_udp_out", "udp_in_tcp_out");

/// A plan as the page and the phone state it (`{"forward": .., "backward": ..}`).
fn plan(p: &Value) -> (String, String) {
    (
        p["forward"].as_str().unwrap_or_default().to_owned(),
        p["backward"].as_str().unwrap_or_default().to_owned(),
    )
}

/// The plan in a call detail record: each direction's path.
fn record_plan(r: &Value) -> (String, String) {
    (
        r["forward"]["path"].as_str().unwrap_or_default().to_owned(),
        r["backward"]["path"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// The lines of the gateway's call detail records once it has `n` (a record is written
/// shortly after its call ends).
fn cdr_lines(gw: &Gateway, n: usize) -> Vec<Value> {
    let path = gw.dir.path().join("data/cdr.jsonl");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(json_of)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} records, want {n}",
            path.display(),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The logged-in page (with [`fake_microphone`]) calls bob, a `voxgate phone --answer --record
/// --play` on an open network, 3 s of audio each way, and hangs up; then checks:
///
/// - the plan, exactly, as all three parties state it: the page (`window.voxgateMedia`), bob's
///   phone (`--json`) and the gateway's call detail record, per direction
///   ([`PAGE_CALLS_OPEN_PHONE`]); the page's leg is TCP both ways, through the gateway, on a
///   `ws://` media address;
/// - bob hears the page: his recording holds exactly the page's sent samples after one µ-law
///   round trip (byte-exact across the page's encoder, the WebSocket leg, the relay and the
///   phone), and it is the source file: Chromium's fake capture runs at 48 kHz and the page's
///   8 kHz AudioContext resamples it, so sample values cannot be byte-exact against the file;
///   both what the page sent and bob's recording must correlate with it at >= 0.9 (best
///   whole-sample lag);
/// - the page hears bob: the PCM the page decoded (`window.voxgateReceivedPcm`) holds bob's
///   clip after one µ-law round trip, byte-exact.
///
/// `shot`: a screenshot of the page in the call, by that name. `number`: the page's own.
fn page_calls_bob_with_audio(
    b: &Browser,
    gw: &Gateway,
    dir: &Path,
    number: &str,
    shot: Option<&str>,
) -> Option<PathBuf> {
    let clip = common::test_clip(dir, "speech-8k.wav", "bob-in.wav", 2.0);
    let rec = dir.join("bob-rec.wav");
    let mark = gw.log_len();
    let bob = common::spawn_phone(
        gw,
        "bob",
        &[
            "--answer",
            "--record",
            rec.to_str().unwrap(),
            "--play",
            clip.to_str().unwrap(),
            "--duration",
            "15",
        ],
    );
    gw.wait_online(mark, "bob");
    let records_before = cdr_lines(gw, 0).len();
    b.type_into("#number", "+15550002");
    b.click("#call");
    // 3 s of audio each way.
    b.wait("audio both ways", || {
        let n = b.js("return [window.voxgateSentPcm.length, window.voxgateReceivedPcm.length]");
        (n[0].as_u64()? >= 24_000 && n[1].as_u64()? >= 24_000).then_some(())
    });
    let media = b.js("return window.voxgateMedia");
    // A page cannot use UDP at all: the gateway's probe found none.
    let caps = b.js("return window.voxgateCapabilities");
    assert_eq!(caps["send_udp"], false, "{caps}");
    assert_eq!(caps["recv_udp"], false, "{caps}");
    assert_eq!(media["caller"], true, "{media}");
    let want_plan = (
        PAGE_CALLS_OPEN_PHONE.0.to_owned(),
        PAGE_CALLS_OPEN_PHONE.1.to_owned(),
    );
    assert_eq!(plan(&media["plan"]), want_plan, "the page's plan: {media}");
    assert_eq!(media["send"]["transport"], "tcp", "{media}");
    assert_eq!(media["recv"]["transport"], "tcp", "{media}");
    let ws = media["gateway_ws"].as_str().unwrap_or_default();
    let tcp = media["gateway_tcp"].as_str().unwrap_or_default();
    let port = tcp.rsplit(':').next().unwrap();
    let leg = media["leg"].as_str().unwrap_or_default();
    assert_eq!(ws, format!("ws://127.0.0.1:{port}/media/{leg}"), "{media}");
    assert_eq!(
        b.text("#media-status"),
        "Media bound (WebSocket through the gateway)."
    );
    let shot = shot.map(|name| b.screenshot(name));
    b.click("#hangup");
    let sent = pcm(&b.js("return window.voxgateSentPcm"));
    let heard = pcm(&b.js("return window.voxgateReceivedPcm"));
    let bob = common::finish(bob);
    assert_eq!(bob.code, 0, "bob: {} {}", bob.json, bob.stderr);
    eprintln!("bob (the phone) after the call with the page: {}", bob.json);
    // bob's phone and the gateway's record say the same plan; bob sends UDP and receives UDP.
    assert_eq!(
        plan(&bob.json["plan"]),
        want_plan,
        "bob's plan: {}",
        bob.json
    );
    assert_eq!(bob.json["transports"]["send"]["transport"], "udp");
    assert_eq!(bob.json["transports"]["recv"]["transport"], "udp");
    let records = cdr_lines(gw, records_before + 1);
    let r = &records[records_before];
    assert_eq!(r["caller"]["number"], number, "{r}");
    assert_eq!(r["callee"]["user"], "bob", "{r}");
    assert_eq!(r["call"], media["call"], "{r}");
    assert_eq!(record_plan(r), want_plan, "the gateway's record: {r}");
    assert_eq!(
        (&r["forward"]["send"], &r["forward"]["recv"]),
        (&json!("tcp"), &json!("udp")),
        "{r}"
    );
    assert_eq!(
        (&r["backward"]["send"], &r["backward"]["recv"]),
        (&json!("udp"), &json!("tcp")),
        "{r}"
    );

    // The page hears bob, byte-exact after one µ-law round trip.
    let want = common::ulaw_round_trip_padded(&voxgate::client::wav::read(&clip).unwrap());
    assert!(
        find(&heard, &want).is_some(),
        "the page's received PCM ({} samples) does not hold bob's clip ({} samples)",
        heard.len(),
        want.len()
    );
    // bob hears the page, byte-exact: his recording holds what the page encoded.
    let recorded = voxgate::client::wav::read(&rec).unwrap();
    let sent_rt: Vec<i16> = sent
        .iter()
        .map(|&s| voxgate::client::g711::ulaw_round_trip(s))
        .collect();
    let at = find(&recorded, &sent_rt[..8000])
        .expect("bob's recording holds the page's first second of sent audio");
    let n = (recorded.len() - at).min(sent_rt.len());
    assert!(
        n >= 16_000,
        "at least 2 s of the page's audio recorded ({n})"
    );
    // The first 2 s, sample for sample (on a loaded machine the gateway may drop later packets
    // as stale: late voice is useless).
    let n = 16_000;
    assert!(
        recorded[at..at + n] == sent_rt[..n],
        "bob's recording differs from what the page sent"
    );
    // And what the page sent, and so what bob recorded, is the file Chromium's fake microphone
    // played: its loudest half second correlates with the file.
    let src = voxgate::client::wav::read(&speech_source()).unwrap();
    let loudest = |x: &[i16]| {
        (0..x.len().saturating_sub(4000))
            .step_by(800)
            .max_by_key(|&i| {
                x[i..i + 4000]
                    .iter()
                    .map(|&s| i64::from(s).pow(2))
                    .sum::<i64>()
            })
            .unwrap()
    };
    let i = loudest(&sent);
    let r = best_correlation(&sent[i..i + 4000], &src);
    eprintln!("correlation of the page's captured audio with the source file: {r:.4}");
    assert!(
        r >= 0.9,
        "the page's audio is not the source file (r = {r:.3})"
    );
    let heard_by_bob = &recorded[at..at + n];
    let i = loudest(heard_by_bob);
    let r = best_correlation(&heard_by_bob[i..i + 4000], &src);
    eprintln!("correlation of bob's recording with the source file: {r:.4}");
    assert!(
        r >= 0.9,
        "bob's recording is not the source file (r = {r:.3})"
    );
    shot
}

/// The browser phone, both ways, through the gateway's WebSocket media leg: Chromium's fake
/// microphone plays `speech-8k.wav`; the page logs in as alice (provisioned by the CLI) and
/// calls bob's `voxgate phone --answer --record --play`; [`page_calls_bob_with_audio`] checks
/// the plan and the audio both ways. (The same call after registering through the page:
/// `a_subscriber_registers_in_a_real_browser_logs_in_and_calls`.)
#[test]
fn the_page_phone_talks_g711_over_a_websocket_leg_both_ways() {
    let Some(b) = Browser::start_with(&fake_microphone()) else {
        return;
    };
    let (gw, addr, dir) = gateway_with_web("");
    log_in(&b, &addr, "alice");
    let shot = page_calls_bob_with_audio(&b, &gw, dir.path(), "+15550001", Some("login-call"));
    update_readme_screenshots(&shot.into_iter().collect::<Vec<_>>());
}

/// The page behind a firewall that blocks all UDP (the lab's `no-udp` class, real nftables in
/// network namespaces: `tests/lab/lab.sh`) calls bob, who is on an open network: Chromium and
/// chromedriver run in client 1's namespace (this test's thread enters it with `setns`, and
/// what it starts inherits it), the gateway in the lab's gateway host. Bob's clip arrives in the
/// page byte-exact, and client 1's router counts the page's media as TCP to and from the
/// gateway's media ports. Needs root (namespaces, nftables): says so loudly without it, fails
/// under CI=true.
#[test]
fn the_page_behind_a_firewall_that_blocks_all_udp_still_calls() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "nft"].iter().all(|t| {
        Command::new(t)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !root || !tools {
        eprintln!(
            "\n*** BROWSER FIREWALL TEST NOT RUN: it needs root, ip and nft (network namespaces). ***\n"
        );
        assert!(!ci, "CI=true: the browser firewall test must run");
        return;
    }
    if need_tool("chromium", "chromium").is_none() {
        return;
    }
    let prefix = format!("vg{}w", std::process::id() % 100_000);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/lab.sh");
    let lab = |args: &[&str]| {
        let out = Command::new(&script)
            .args(args)
            .env("LAB", &prefix)
            .env("CLIENTS", "2")
            .output()
            .expect("run lab.sh");
        assert!(
            out.status.success(),
            "lab.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    struct Down(PathBuf, String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = Command::new(&self.0)
                .arg("down")
                .env("LAB", &self.1)
                .output();
        }
    }
    lab(&["up"]);
    let _down = Down(script.clone(), prefix.clone());
    lab(&["fw", "1", "no-udp"]);
    lab(&["fw", "2", "open"]);
    let gw_ns = format!("{prefix}gw");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("voxgate.toml");
    std::fs::write(
        &cfg,
        "[web]\nenabled = true\nlisten = \"172.31.0.1:7481\"\n",
    )
    .unwrap();
    let gw = Gateway::start_on(
        &["ip", "netns", "exec", &gw_ns],
        &[
            "--listen",
            "::",
            "--control-port",
            "7400",
            "--media-port-base",
            "7401",
            "--probe-ports",
            "7390,7391",
            "--dump-interval",
            "0",
        ],
        "172.31.0.1",
        &["--config", cfg.to_str().unwrap()],
    );
    gw.wait_log(0, "the ready line", |l| l.contains("voxgate is ready"));
    let clip = common::test_clip(dir.path(), "speech-8k.wav", "bob-in.wav", 2.0);
    let mark = gw.log_len();
    let c2 = format!("{prefix}c2");
    let bob = common::spawn_phone_on(
        &["ip", "netns", "exec", &c2],
        &gw,
        "bob",
        &[
            "--answer",
            "--play",
            clip.to_str().unwrap(),
            "--duration",
            "20",
        ],
    );
    gw.wait_online(mark, "bob");
    // From here this thread, and chromedriver and Chromium, which it starts, live behind
    // router 1's no-udp firewall.
    /// Puts this thread back into its own network namespace when dropped (before the lab is
    /// torn down: `lab.sh down` kills every process in the lab's namespaces, and one started
    /// from inside would be among them).
    struct Home(std::fs::File);
    impl Drop for Home {
        fn drop(&mut self) {
            // SAFETY: setns on this thread with a namespace file we hold open.
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&self.0), libc::CLONE_NEWNET) };
        }
    }
    let _home = Home(std::fs::File::open("/proc/thread-self/ns/net").unwrap());
    let ns = std::fs::File::open(format!("/var/run/netns/{prefix}c1")).unwrap();
    // SAFETY: setns on this thread with a namespace file we hold open.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    let origin = "http://172.31.0.1:7481";
    // The page is plain HTTP on a lab address: Chromium treats it as a secure context (which
    // getUserMedia and AudioWorklet need) only when told to.
    let b = Browser::start_with(&[
        "--use-fake-ui-for-media-stream".into(),
        "--use-fake-device-for-media-stream".into(),
        "--autoplay-policy=no-user-gesture-required".into(),
        format!("--unsafely-treat-insecure-origin-as-secure={origin}"),
    ])
    .expect("chromium");
    log_in(&b, "172.31.0.1:7481", "alice");
    lab(&["reset", "1"]);
    b.type_into("#number", "+15550002");
    b.click("#call");
    b.wait("bob's clip in the page", || {
        let n = b.js("return window.voxgateReceivedPcm.length");
        (n.as_u64()? >= 24_000).then_some(())
    });
    let caps = b.js("return window.voxgateCapabilities");
    assert_eq!(caps["send_udp"], false, "{caps}");
    assert_eq!(caps["recv_udp"], false, "{caps}");
    // Behind NAT or not, bob is open: Table 1's case 12 (NAT changes only direct directions).
    let want_plan = (
        PAGE_CALLS_OPEN_PHONE.0.to_owned(),
        PAGE_CALLS_OPEN_PHONE.1.to_owned(),
    );
    let media = b.js("return window.voxgateMedia");
    assert_eq!(plan(&media["plan"]), want_plan, "the page's plan: {media}");
    let heard = pcm(&b.js("return window.voxgateReceivedPcm"));
    let want = common::ulaw_round_trip_padded(&voxgate::client::wav::read(&clip).unwrap());
    assert!(
        find(&heard, &want).is_some(),
        "the page behind no-udp did not hear bob's clip"
    );
    b.click("#hangup");
    let r = cdr_lines(&gw, 1)[0].clone();
    assert_eq!(record_plan(&r), want_plan, "the gateway's record: {r}");
    let counters = lab(&["counters", "1"]);
    let count = |name: &str| -> u64 {
        let at = counters.find(&format!("counter {name} ")).expect(name);
        counters[at..]
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("a packet count")
    };
    eprintln!("router 1 counters:\n{counters}");
    assert!(count("tcp_in_gw") >= 40, "bob's audio came in over TCP");
    assert!(
        count("tcp_out_gw") >= 40,
        "the page's audio went out over TCP"
    );
    assert_eq!(count("udp_out_gw") + count("udp_in_gw"), 0, "no UDP media");
    drop(b);
    drop(bob);
}

/// The page answers: bob's `voxgate phone --call` rings the page, alice clicks Answer, and
/// what bob plays arrives in the page byte-exact after one µ-law round trip; bob records the
/// page's (fake) microphone.
#[test]
fn the_page_answers_a_call_with_audio() {
    let Some(b) = Browser::start_with(&[
        "--use-fake-ui-for-media-stream".into(),
        "--use-fake-device-for-media-stream".into(),
        "--autoplay-policy=no-user-gesture-required".into(),
    ]) else {
        return;
    };
    let (gw, addr, dir) = gateway_with_web("");
    log_in(&b, &addr, "alice");
    let clip = common::test_clip(dir.path(), "speech-8k.wav", "bob-in.wav", 1.5);
    let rec = dir.path().join("bob-rec.wav");
    let bob = common::spawn_phone(
        &gw,
        "bob",
        &[
            "--call",
            "+15550001",
            "--play",
            clip.to_str().unwrap(),
            "--record",
            rec.to_str().unwrap(),
        ],
    );
    b.wait("the ring", || {
        b.text("#call-status")
            .starts_with("Incoming call from +15550002")
            .then_some(())
    });
    b.click("#answer");
    // bob hangs up when his clip is played; the page shows the end.
    b.wait("the call's end", || {
        b.text("#call-status")
            .starts_with("Call ended")
            .then_some(())
    });
    let bob = common::finish(bob);
    assert_eq!(bob.code, 0, "bob: {} {}", bob.json, bob.stderr);
    let media = b.js("return window.voxgateMedia");
    assert_eq!(media["caller"], false, "{media}");
    // bob (open) calls the page (no UDP): Table 1's case 12 mirrored, as the page, bob's phone
    // and the gateway's record say.
    let want_plan = (
        PAGE_CALLS_OPEN_PHONE.1.to_owned(),
        PAGE_CALLS_OPEN_PHONE.0.to_owned(),
    );
    assert_eq!(plan(&media["plan"]), want_plan, "the page's plan: {media}");
    assert_eq!(
        plan(&bob.json["plan"]),
        want_plan,
        "bob's plan: {}",
        bob.json
    );
    let r = cdr_lines(&gw, 1)[0].clone();
    assert_eq!(record_plan(&r), want_plan, "the gateway's record: {r}");
    let heard = pcm(&b.js("return window.voxgateReceivedPcm"));
    let want = common::ulaw_round_trip_padded(&voxgate::client::wav::read(&clip).unwrap());
    assert!(
        find(&heard, &want).is_some(),
        "the page's received PCM ({} samples) does not hold bob's clip ({} samples)",
        heard.len(),
        want.len()
    );
    let sent = pcm(&b.js("return window.voxgateSentPcm"));
    let recorded = voxgate::client::wav::read(&rec).unwrap();
    let sent_rt: Vec<i16> = sent
        .iter()
        .map(|&s| voxgate::client::g711::ulaw_round_trip(s))
        .collect();
    assert!(
        sent_rt.len() >= 4000,
        "the page sent {} samples",
        sent.len()
    );
    assert!(
        find(&recorded, &sent_rt[..4000]).is_some(),
        "bob's recording holds the page's first half second"
    );
}

/// A self-signed certificate for `name`, written as `<file>-cert.pem` and `<file>-key.pem`.
struct SelfSigned {
    cert: PathBuf,
    key: PathBuf,
    /// The certificate, DER (what a client is shown in the handshake).
    der: Vec<u8>,
    /// The base64 SHA-256 of its public key: Chromium's `--ignore-certificate-errors-spki-list`
    /// trusts exactly that key.
    spki: String,
}

fn self_signed(dir: &Path, file: &str, name: &str) -> SelfSigned {
    use base64::Engine;
    use sha2::Digest;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{file}-cert.pem")),
        dir.join(format!("{file}-key.pem")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    SelfSigned {
        cert: cert_path,
        key: key_path,
        der: cert.der().to_vec(),
        spki: base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(
            rcgen::PublicKeyData::subject_public_key_info(&key),
        )),
    }
}

/// A gateway whose web listener speaks HTTPS (`[web] https = true`) with `cert`/`key` in
/// `[tls]`, and `extra` configuration; the gateway and a look-up of its ready line's words
/// (`web=`, `single_port=`, ...).
fn gateway_with_https(
    dir: &Path,
    cert: &Path,
    key: &Path,
    extra: &str,
) -> (Gateway, impl Fn(&str) -> String) {
    let cfg = dir.join("voxgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[web]\nenabled = true\nlisten = \"127.0.0.1:0\"\nhttps = true\n\
             [tls]\ncert = {:?}\nkey = {:?}\ncontrol_port = 0\n{extra}",
            cert.to_str().unwrap(),
            key.to_str().unwrap()
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    gw.wait_log(0, "the ready line", |l| l.contains("voxgate is ready"));
    let ready = gw
        .log_text()
        .lines()
        .find(|l| l.contains("voxgate is ready"))
        .expect("ready line")
        .to_owned();
    let word = move |k: &str| {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("{k} in {ready}"))
            .to_owned()
    };
    (gw, word)
}

/// `[web] https = true`: the pages, the API and the WebSocket control bridge over TLS with the
/// `[tls]` certificate. Chromium trusts exactly this server's key (its SPKI hash), loads the
/// log-in page over HTTPS and logs in over `wss://`; a plain HTTP request to the port gets no
/// HTTP answer.
#[test]
fn the_web_listener_serves_https_with_the_tls_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let c = self_signed(dir.path(), "web", "127.0.0.1");
    let Some(b) =
        Browser::start_with(&[format!("--ignore-certificate-errors-spki-list={}", c.spki)])
    else {
        return;
    };
    let (gw, word) = gateway_with_https(dir.path(), &c.cert, &c.key, "");
    let addr = word("web=");
    // Plain HTTP on the HTTPS port: no HTTP answer (a TLS alert, or nothing).
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/"),
        "plain HTTP answered on the HTTPS port"
    );
    // The page over HTTPS, the control protocol over wss://, the gateway's certificate.
    b.go(&format!("https://{addr}/login"));
    assert_eq!(
        b.js("return location.protocol + ' ' + document.title"),
        "https: voxgate: log in"
    );
    let mark = gw.log_len();
    b.type_into("#user", "alice");
    b.type_into("#password", &common::password("alice"));
    b.click("#login-button");
    let status = b.wait("the welcome", || {
        let t = b.text("#status");
        (!t.is_empty()).then_some(t)
    });
    assert_eq!(status, "Logged in as alice, number +15550001. Online.");
    gw.wait_online(mark, "alice");
}

type HttpsStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS connection to the web listener at `addr` (`127.0.0.1:port`), trusting `trusted`,
/// offering ALPN `http/1.1` as a browser does; the handshake is done.
fn https_connect(addr: &str, trusted: &[&SelfSigned]) -> HttpsStream {
    try_https_connect(addr, trusted)
        .unwrap_or_else(|e| panic!("TLS handshake with the web listener: {e}"))
}

/// [`https_connect`], or why the handshake failed.
fn try_https_connect(addr: &str, trusted: &[&SelfSigned]) -> Result<HttpsStream, std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add(c.der.clone().into()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let ip: std::net::IpAddr = addr.rsplit_once(':').unwrap().0.parse().unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), ip.into()).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// The certificate the server showed on this connection.
fn shown_certificate(s: &HttpsStream) -> Vec<u8> {
    s.conn.peer_certificates().expect("a certificate")[0].to_vec()
}

/// `[web] https = true` reloads its certificate and key on SIGHUP with the control listener's
/// (the same reload): connections made after the signal are shown the new certificate; a
/// connection made before keeps its session and is still served (a keep-alive request on it
/// after the reload), and a page logged in over `wss://` before the reload keeps working on
/// its WebSocket (it dials and gets the gateway's answer, still "Online."). A certificate file
/// that does not load keeps the running one.
#[test]
fn sighup_reloads_the_web_listeners_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let first = self_signed(dir.path(), "first", "127.0.0.1");
    let second = self_signed(dir.path(), "second", "127.0.0.1");
    let live = (
        dir.path().join("live-cert.pem"),
        dir.path().join("live-key.pem"),
    );
    std::fs::copy(&first.cert, &live.0).unwrap();
    std::fs::copy(&first.key, &live.1).unwrap();
    // (A fake microphone: the page opens one before it dials.)
    let mut args = fake_microphone();
    args.push(format!(
        "--ignore-certificate-errors-spki-list={},{}",
        first.spki, second.spki
    ));
    let Some(b) = Browser::start_with(&args) else {
        return;
    };
    let (gw, word) = gateway_with_https(dir.path(), &live.0, &live.1, "");
    let addr = word("web=");

    // Before the reload: the page logs in over wss://; a keep-alive connection is served with
    // the first certificate.
    b.go(&format!("https://{addr}/login"));
    let mark = gw.log_len();
    b.type_into("#user", "alice");
    b.type_into("#password", &common::password("alice"));
    b.click("#login-button");
    b.wait("the welcome", || {
        b.text("#status").starts_with("Logged in").then_some(())
    });
    gw.wait_online(mark, "alice");
    let mut before = https_connect(&addr, &[&first, &second]);
    assert!(
        shown_certificate(&before) == first.der,
        "the first certificate"
    );
    let (code, _) = http_on(&mut before, false, "GET", &addr, "/style.css", None, None);
    assert_eq!(code, 200);

    // The second certificate replaces the first in the files; SIGHUP.
    std::fs::copy(&second.cert, &live.0).unwrap();
    std::fs::copy(&second.key, &live.1).unwrap();
    let mark = gw.log_len();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    gw.wait_log(mark, "the certificate reload", |l| {
        l.contains("TLS certificate reloaded")
    });

    // A new connection is shown the second certificate; one that trusts only the first is
    // refused by its own check.
    let mut after = https_connect(&addr, &[&first, &second]);
    assert!(
        shown_certificate(&after) == second.der,
        "a connection after SIGHUP is shown the new certificate"
    );
    let (code, page) = http_on(&mut after, true, "GET", &addr, "/login", None, None);
    assert_eq!(code, 200);
    assert!(page.contains("<title>voxgate: log in</title>"), "{page}");
    let refused = try_https_connect(&addr, &[&first]).map(|_| ());
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("invalid peer certificate")),
        "the first certificate is no longer shown: {refused:?}"
    );
    // The connection from before is still open and served, on its old session.
    let (code, _) = http_on(&mut before, true, "GET", &addr, "/login", None, None);
    assert_eq!(
        code, 200,
        "the connection made before the reload is still served"
    );
    assert!(shown_certificate(&before) == first.der);
    // The page from before: its WebSocket is the one it logged in on; it dials carol (offline)
    // and shows the gateway's answer.
    assert_eq!(
        b.text("#status"),
        "Logged in as alice, number +15550001. Online."
    );
    b.type_into("#number", "+15550003");
    b.click("#call");
    let ended = b.wait("the call's end", || {
        let t = b.text("#call-status");
        t.starts_with("Call ended").then_some(t)
    });
    assert_eq!(ended, "Call ended: offline");
    assert_eq!(
        b.text("#status"),
        "Logged in as alice, number +15550001. Online."
    );

    // A certificate file that does not load keeps the running one.
    std::fs::write(&live.0, "not a certificate").unwrap();
    let mark = gw.log_len();
    // SAFETY: as above.
    unsafe { libc::kill(gw.pid(), libc::SIGHUP) };
    gw.wait_log(mark, "the refusal", |l| {
        l.contains("TLS certificate not reloaded")
    });
    let kept = https_connect(&addr, &[&first, &second]);
    assert!(
        shown_certificate(&kept) == second.der,
        "the running certificate is kept"
    );
}

/// A page served over HTTPS from a public name (`gw.test`, which Chromium resolves to loopback
/// by its host rules, so that `ws://` from the page would be blocked as mixed content) carries
/// its media over `wss://` through the single port (TLS media, run by the shard): it calls bob, a
/// `voxgate phone --answer`; the page is told `wss://gw.test:<single port>/media/<leg>`, the
/// single port hands that connection to the leg's shard, and the audio crosses byte-exact both
/// ways as in the plain browser audio test.
#[test]
fn an_https_page_carries_its_media_over_wss_through_the_single_port() {
    let dir = tempfile::tempdir().unwrap();
    let c = self_signed(dir.path(), "web", "gw.test");
    let mut args = vec![
        format!("--ignore-certificate-errors-spki-list={}", c.spki),
        "--host-resolver-rules=MAP gw.test 127.0.0.1".into(),
    ];
    args.extend(fake_microphone());
    let Some(b) = Browser::start_with(&args) else {
        return;
    };
    let (gw, word) = gateway_with_https(
        dir.path(),
        &c.cert,
        &c.key,
        "[single_port]\nport = 0\nmedia = \"tls\"\ntls_engine = \"shard\"\n",
    );
    let web_port = word("web=").rsplit(':').next().unwrap().to_owned();
    let single_port = word("single_port=").rsplit(':').next().unwrap().to_owned();

    let clip = common::test_clip(dir.path(), "speech-8k.wav", "bob-in.wav", 2.0);
    let rec = dir.path().join("bob-rec.wav");
    let mark = gw.log_len();
    let bob = common::spawn_phone(
        &gw,
        "bob",
        &[
            "--answer",
            "--record",
            rec.to_str().unwrap(),
            "--play",
            clip.to_str().unwrap(),
            "--duration",
            "15",
        ],
    );
    gw.wait_online(mark, "bob");
    b.go(&format!("https://gw.test:{web_port}/login"));
    assert_eq!(
        b.js("return location.protocol + ' ' + location.hostname"),
        "https: gw.test"
    );
    b.type_into("#user", "alice");
    b.type_into("#password", &common::password("alice"));
    b.click("#login-button");
    b.wait("the welcome", || {
        b.text("#status").starts_with("Logged in").then_some(())
    });
    let mark = gw.log_len();
    b.type_into("#number", "+15550002");
    b.click("#call");
    b.wait("audio both ways", || {
        let n = b.js("return [window.voxgateSentPcm.length, window.voxgateReceivedPcm.length]");
        (n[0].as_u64()? >= 24_000 && n[1].as_u64()? >= 24_000).then_some(())
    });
    let media = b.js("return window.voxgateMedia");
    let leg = media["leg"].as_str().unwrap_or_default();
    assert_eq!(
        plan(&media["plan"]),
        (
            PAGE_CALLS_OPEN_PHONE.0.to_owned(),
            PAGE_CALLS_OPEN_PHONE.1.to_owned()
        ),
        "{media}"
    );
    assert_eq!(media["gateway_tcp_tls"], true, "{media}");
    assert_eq!(
        media["gateway_ws"].as_str().unwrap_or_default(),
        format!("wss://gw.test:{single_port}/media/{leg}"),
        "{media}"
    );
    assert_eq!(
        b.text("#media-status"),
        "Media bound (WebSocket through the gateway)."
    );
    gw.wait_log(mark, "the page's wss leg handed to its shard", |l| {
        l.contains("media connection handed to its shard") && l.contains("wss")
    });
    b.click("#hangup");
    let sent = pcm(&b.js("return window.voxgateSentPcm"));
    let heard = pcm(&b.js("return window.voxgateReceivedPcm"));
    let bob = common::finish(bob);
    assert_eq!(bob.code, 0, "bob: {} {}", bob.json, bob.stderr);
    // The page hears bob, byte-exact after one µ-law round trip.
    let want = common::ulaw_round_trip_padded(&voxgate::client::wav::read(&clip).unwrap());
    assert!(
        find(&heard, &want).is_some(),
        "the page's received PCM ({} samples) does not hold bob's clip ({} samples)",
        heard.len(),
        want.len()
    );
    // bob hears the page: his recording holds the page's first second, sample for sample.
    let recorded = voxgate::client::wav::read(&rec).unwrap();
    let sent_rt: Vec<i16> = sent
        .iter()
        .map(|&s| voxgate::client::g711::ulaw_round_trip(s))
        .collect();
    assert!(
        find(&recorded, &sent_rt[..8000]).is_some(),
        "bob's recording holds the page's first second of sent audio"
    );
}

/// The README shows the pages' screenshots from `docs/screenshots/`. A test run keeps its own
/// under `target/web-screenshots/`; only `VOXGATE_UPDATE_SCREENSHOTS=1` copies them into the
/// source tree, so an ordinary run leaves the checkout clean.
fn update_readme_screenshots(shots: &[PathBuf]) {
    if std::env::var_os("VOXGATE_UPDATE_SCREENSHOTS").is_none_or(|v| v != "1") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    for p in shots {
        std::fs::copy(p, dir.join(p.file_name().unwrap())).unwrap();
    }
}
