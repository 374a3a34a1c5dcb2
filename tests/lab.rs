//! The firewall lab: voxgate against real kernel firewalls and real NAT. A gateway host and
//! three clients, each behind its own router namespace with nftables rules (`tests/lab/lab.sh`).
//! For all 16 cases of the seed's Table 1: both clients log in and are probed (the probe must
//! find the class the router enforces), a call is placed by number, audio goes both ways
//! byte-exact, and the transports really used per direction match the plan — checked from the
//! phones, from the routers' nftables counters, and from the gateway's own counters. Then NAT
//! (endpoint-independent and symmetric), a three-party conference across three classes, and a
//! firewall that changes mid-call.
//!
//! Needs root (network namespaces, nftables). Without it the test says so loudly; under
//! `CI=true` that is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    Gateway, PhoneResult, finish, spawn_phone_at, spawn_phone_on, test_clip, ulaw_round_trip_padded,
};
use voxgate::client::wav;
use voxgate::control::paths;
use voxgate::control::planner::{self, Capabilities, Path as MediaPath};

const GW_IP: &str = "172.31.0.1";
/// Media packets a direction must show to count as "this way" (a 1.2 s clip is 60 packets,
/// more with the silence that follows), and the most a direction not taken may show (STUN
/// bindings and keep-alives).
const USED: u64 = 40;
const UNUSED: u64 = 8;
/// Media packets a direction that switched to a proven direct path may still show through the
/// gateway: the 300 ms the sender sends on both paths, with margin.
const SWITCH: u64 = 20;

struct Lab {
    prefix: String,
    script: PathBuf,
}

impl Lab {
    fn up() -> Option<Lab> {
        Lab::up_with("x", &[])
    }

    /// A lab whose namespaces are named with `tag` (labs in one test process must differ),
    /// built with `env` set for `lab.sh up` (e.g. `GW_NAT=1`).
    fn up_with(tag: &str, env: &[(&str, &str)]) -> Option<Lab> {
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
            let why = if root {
                "ip or nft is missing (apt-get install iproute2 nftables)"
            } else {
                "not running as root"
            };
            eprintln!(
                "\n*** LAB TESTS NOT RUN: {why}. The firewall lab needs root, network \
                 namespaces and nftables. ***\n"
            );
            assert!(!ci, "CI=true: the firewall lab must run in CI ({why})");
            return None;
        }
        let lab = Lab {
            prefix: format!("vg{}{tag}", std::process::id() % 100_000),
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/lab.sh"),
        };
        let out = Command::new(&lab.script)
            .arg("up")
            .env("LAB", &lab.prefix)
            .envs(env.iter().copied())
            .output()
            .expect("run lab.sh");
        assert!(
            out.status.success(),
            "lab.sh up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(lab)
    }

    fn sh(&self, args: &[&str]) -> String {
        let out = Command::new(&self.script)
            .args(args)
            .env("LAB", &self.prefix)
            .output()
            .expect("run lab.sh");
        assert!(
            out.status.success(),
            "lab.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn host(&self, h: &str) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            format!("{}{h}", self.prefix),
        ]
    }

    fn set(&self, client: usize, class: &str, nat: &str) {
        let n = client.to_string();
        self.sh(&["fw", &n, class]);
        self.sh(&["nat", &n, nat]);
        self.sh(&["reset", &n]);
    }

    /// Router counters: name -> packets.
    fn counters(&self, client: usize) -> std::collections::HashMap<String, u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{}r{client}", self.prefix)])
            .args(["nft", "-j", "list", "counters", "table", "inet", "lab"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("counter"))
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["packets"].as_u64().unwrap(),
                )
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("down")
            .env("LAB", &self.prefix)
            .output();
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn expected_caps(class: &str, nat: &str) -> Capabilities {
    let (send, recv) = match class {
        // The probe only sees the path to the gateway: these look open.
        "open" | "portal" | "port-restricted" => (true, true),
        "no-udp-out" => (false, true),
        "no-udp-in" => (true, false),
        "no-udp" => (false, false),
        _ => unreachable!(),
    };
    let natted = nat != "none";
    // Behind NAT, UDP can only come back as replies to what the client sent: a client that
    // cannot send UDP then cannot receive any either.
    Capabilities::new(send, recv && (send || !natted)).with_nat(natted)
}

/// Whether this class lets UDP between the clients through (checks and direct media).
fn peer_udp_ok(class: &str) -> bool {
    !matches!(class, "portal" | "port-restricted")
}

/// The path a direction really takes: Table 1's direct directions only once the phones proved
/// them (a candidate whose checks get through), every other direction as it starts through the
/// gateway.
fn used_path(target: MediaPath, s: (&Party, Capabilities), r: (&Party, Capabilities)) -> MediaPath {
    if paths::is_direct_candidate(target, s.1, r.1)
        && peer_udp_ok(s.0.class)
        && peer_udp_ok(r.0.class)
    {
        MediaPath::DirectUdp
    } else {
        paths::start_path(target, r.1)
    }
}

fn caps_of(r: &PhoneResult) -> Capabilities {
    serde_json::from_value(r.json["capabilities"].clone()).unwrap()
}

fn path_name(p: MediaPath) -> String {
    serde_json::to_value(p)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

struct Party<'a> {
    client: usize,
    user: &'a str,
    class: &'a str,
    nat: &'a str,
}

/// One call from `a` to `b`; everything a user and an operator would check. Returns both
/// phones' results.
fn call_case(lab: &Lab, gw: &Gateway, a: &Party, b: &Party) -> (PhoneResult, PhoneResult) {
    let case = format!(
        "{} ({}, nat {}) calls {} ({}, nat {})",
        a.user, a.class, a.nat, b.user, b.class, b.nat
    );
    lab.set(a.client, a.class, a.nat);
    lab.set(b.client, b.class, b.nat);
    let before = gw.dump_counters();
    let dir = gw.dir.path();
    let a_in = test_clip(dir, "speech-8k.wav", "a-in.wav", 1.2);
    let b_in = test_clip(dir, "reply-8k.wav", "b-in.wav", 1.2);
    let a_rec = dir.join("a-rec.wav");
    let b_rec = dir.join("b-rec.wav");
    let number = format!("+1555000{}", b.client);
    let mark = gw.log_len();
    let callee = spawn_phone_on(
        &strs(&lab.host(&format!("c{}", b.client))),
        gw,
        b.user,
        &[
            "--answer",
            "--play",
            b_in.to_str().unwrap(),
            "--record",
            b_rec.to_str().unwrap(),
            "--wait",
            "20",
        ],
    );
    gw.wait_online(mark, b.user);
    let caller = spawn_phone_on(
        &strs(&lab.host(&format!("c{}", a.client))),
        gw,
        a.user,
        &[
            "--call",
            &number,
            "--play",
            a_in.to_str().unwrap(),
            "--record",
            a_rec.to_str().unwrap(),
        ],
    );
    let ra = finish(caller);
    let rb = finish(callee);
    for (who, r) in [(a.user, &ra), (b.user, &rb)] {
        assert_eq!(r.code, 0, "{case}: {who} failed: {}\n{}", r.json, r.stderr);
    }
    // The probe found what the router enforces.
    assert_eq!(
        caps_of(&ra),
        expected_caps(a.class, a.nat),
        "{case}: {}'s probe",
        a.user
    );
    assert_eq!(
        caps_of(&rb),
        expected_caps(b.class, b.nat),
        "{case}: {}'s probe",
        b.user
    );
    if a.nat != "none" {
        let mapped = ra.json["mapped"].as_str().unwrap_or("");
        assert!(
            mapped.starts_with(&format!("172.31.0.1{}:", a.client)),
            "{case}: the mapped address is the router's public one: {mapped}"
        );
    }
    // The plan is Table 1's for those capabilities, and both phones used it.
    let plan = planner::plan(caps_of(&ra), caps_of(&rb));
    for r in [&ra, &rb] {
        assert_eq!(r.json["plan"]["forward"], path_name(plan.forward), "{case}");
        assert_eq!(
            r.json["plan"]["backward"],
            path_name(plan.backward),
            "{case}"
        );
        assert_eq!(r.json["received"]["lost"], 0, "{case}: {}", r.json);
    }
    // Audio both ways, byte-exact after one G.711 round trip.
    for (sent, rec, what) in [(&a_in, &b_rec, "b hears a"), (&b_in, &a_rec, "a hears b")] {
        let want = ulaw_round_trip_padded(&wav::read(sent).unwrap());
        let got = wav::read(rec).unwrap();
        assert!(
            got.len() >= want.len() && got[..want.len()] == want[..],
            "{case}: {what}: the recording differs from what was sent"
        );
    }
    // The paths really taken: every direction starts through the gateway; Table 1's direct
    // directions go direct once proven (both phones' routers pass UDP between them).
    let (ca, cb) = (caps_of(&ra), caps_of(&rb));
    let used = planner::Plan {
        forward: used_path(plan.forward, (a, ca), (b, cb)),
        backward: used_path(plan.backward, (b, cb), (a, ca)),
    };
    for (who, r, out) in [(a.user, &ra, used.forward), (b.user, &rb, used.backward)] {
        assert_eq!(
            r.json["paths"]["send_direct"],
            out == MediaPath::DirectUdp,
            "{case}: {who} sends direct iff proven: {}",
            r.json
        );
    }
    // What the routers saw: UDP where the firewall allows it, TCP only on the blocked
    // segment, and (almost) no gateway where the clients talk directly.
    for (p, out, inn) in [
        (a, used.forward, used.backward),
        (b, used.backward, used.forward),
    ] {
        let c = lab.counters(p.client);
        let expect = |name: &str, used: bool| {
            let n = c[name];
            // The gateway's segments of a direction that switched to direct carry the switch.
            let slack = if name.starts_with("udp_out_gw") && out == MediaPath::DirectUdp
                || name.starts_with("udp_in_gw") && inn == MediaPath::DirectUdp
            {
                SWITCH
            } else {
                0
            };
            if used {
                assert!(
                    n >= USED,
                    "{case}: {}'s router: {name} = {n}, expected media",
                    p.user
                );
            } else {
                assert!(
                    n <= UNUSED + slack,
                    "{case}: {}'s router: {name} = {n}, expected none",
                    p.user
                );
            }
        };
        expect("udp_out_peer", out == MediaPath::DirectUdp);
        expect(
            "udp_out_gw",
            matches!(out, MediaPath::UdpViaGateway | MediaPath::UdpInTcpOut),
        );
        expect(
            "tcp_out_gw",
            matches!(out, MediaPath::TcpInUdpOut | MediaPath::TcpBoth),
        );
        expect("udp_in_peer", inn == MediaPath::DirectUdp);
        expect(
            "udp_in_gw",
            matches!(inn, MediaPath::UdpViaGateway | MediaPath::TcpInUdpOut),
        );
        expect(
            "tcp_in_gw",
            matches!(inn, MediaPath::UdpInTcpOut | MediaPath::TcpBoth),
        );
    }
    // And what the gateway counted.
    let after = gw.dump_counters();
    let _ = before;
    let g = |k: &str| after[k]["packets"].as_u64().unwrap();
    let paths = [used.forward, used.backward];
    let switched = paths.iter().filter(|p| **p == MediaPath::DirectUdp).count() as u64;
    let udp_in = paths
        .iter()
        .any(|p| matches!(p, MediaPath::UdpViaGateway | MediaPath::UdpInTcpOut));
    let tcp_in = paths
        .iter()
        .any(|p| matches!(p, MediaPath::TcpInUdpOut | MediaPath::TcpBoth));
    let udp_out = paths
        .iter()
        .any(|p| matches!(p, MediaPath::UdpViaGateway | MediaPath::TcpInUdpOut));
    let tcp_out = paths
        .iter()
        .any(|p| matches!(p, MediaPath::UdpInTcpOut | MediaPath::TcpBoth));
    // STUN bindings and their answers are counted in the flows too.
    let stun = after["bindings"].as_u64().unwrap_or(0) * 2;
    for (k, used) in [
        ("udp_in", udp_in),
        ("tcp_in", tcp_in),
        ("udp_out", udp_out),
        ("tcp_out", tcp_out),
    ] {
        let n = g(k);
        if used {
            assert!(n >= USED, "{case}: gateway {k} = {n}, expected media");
        } else {
            assert!(
                n <= UNUSED + stun + switched * SWITCH,
                "{case}: gateway {k} = {n}, expected none"
            );
        }
    }
    eprintln!(
        "lab: {case}: plan forward {:?}, backward {:?}; taken forward {:?}, backward {:?}: ok",
        plan.forward, plan.backward, used.forward, used.backward
    );
    (ra, rb)
}

fn start_gateway(lab: &Lab) -> Gateway {
    start_gateway_with(lab, &[])
}

fn start_gateway_with(lab: &Lab, extra: &[&str]) -> Gateway {
    Gateway::start_on(
        &strs(&lab.host("gw")),
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
        GW_IP,
        extra,
    )
}

const CLASSES: [&str; 4] = ["open", "no-udp-out", "no-udp-in", "no-udp"];

#[test]
fn firewall_lab() {
    let Some(lab) = Lab::up() else { return };
    let gw = start_gateway(&lab);

    // Table 1: every caller class x every callee class, without NAT.
    for ca in ["no-udp-in", "no-udp-out", "no-udp", "open"] {
        for cb in ["no-udp-in", "no-udp-out", "no-udp", "open"] {
            let _ = CLASSES;
            call_case(
                &lab,
                &gw,
                &Party {
                    client: 1,
                    user: "alice",
                    class: ca,
                    nat: "none",
                },
                &Party {
                    client: 2,
                    user: "bob",
                    class: cb,
                    nat: "none",
                },
            );
        }
    }
    // NAT: endpoint-independent masquerade and symmetric NAT, on one side and on both.
    for (na, nb) in [
        ("none", "masquerade"),
        ("symmetric", "none"),
        ("masquerade", "symmetric"),
    ] {
        call_case(
            &lab,
            &gw,
            &Party {
                client: 1,
                user: "alice",
                class: "open",
                nat: na,
            },
            &Party {
                client: 2,
                user: "bob",
                class: "open",
                nat: nb,
            },
        );
    }
    call_case(
        &lab,
        &gw,
        &Party {
            client: 1,
            user: "alice",
            class: "no-udp-in",
            nat: "symmetric",
        },
        &Party {
            client: 2,
            user: "bob",
            class: "no-udp-out",
            nat: "none",
        },
    );
    conference_across_three_classes(&lab, &gw);
    firewall_change_mid_call(&lab, &gw);
    // Firewalls the probe cannot see through: the probe says "open", Table 1 says direct, the
    // checks fail, and the call stays through the gateway from its first packet.
    for class in ["portal", "port-restricted"] {
        let (ra, rb) = call_case(
            &lab,
            &gw,
            &Party {
                client: 1,
                user: "alice",
                class,
                nat: "none",
            },
            &Party {
                client: 2,
                user: "bob",
                class,
                nat: "none",
            },
        );
        for (who, r) in [("alice", &ra), ("bob", &rb)] {
            assert_eq!(r.json["result"], "completed", "{class}: {who}: {}", r.json);
            assert_eq!(
                r.json["replans"], 0,
                "{class}: {who}: no media_failed, no re-plan"
            );
            // The candidate was checked (a bounded number of times) and never used.
            let checks = r.json["paths"]["checks_sent"].as_u64().unwrap_or(99);
            assert!((1..=7).contains(&checks), "{class}: {who}: {}", r.json);
            assert_eq!(r.json["paths"]["direct_packets"], 0, "{class}: {who}");
            let first = r.json["received"]["first_packet_ms"]
                .as_f64()
                .unwrap_or(f64::MAX);
            assert!(
                first <= 1000.0,
                "{class}: {who}: first audio after {first} ms"
            );
            eprintln!("lab: {class}: {who} heard audio {first:.0} ms after answer");
        }
    }
    nat_mapping_loss_mid_call(&lab, &gw);
    direct_path_cut_mid_call(&lab, &gw);
    // Last: it takes addresses away from the clients.
    ipv6_only_calls_ipv4_only(&lab, &gw);
    drop(gw);
}

/// A call of `--duration 10` between clients 1 and 2 (silence both ways); `change` runs 3 s
/// after the media instructions went out. Both phones must complete, and no silence may last
/// longer than 2 s. Returns both results.
fn mid_call(lab: &Lab, gw: &Gateway, what: &str, change: &dyn Fn()) -> (PhoneResult, PhoneResult) {
    let mark = gw.log_len();
    let callee = spawn_phone_on(
        &strs(&lab.host("c2")),
        gw,
        "bob",
        &["--answer", "--duration", "11", "--wait", "20"],
    );
    gw.wait_online(mark, "bob");
    let mark = gw.log_len();
    let caller = spawn_phone_on(
        &strs(&lab.host("c1")),
        gw,
        "alice",
        &["--call", "+15550002", "--duration", "10"],
    );
    gw.wait_log(mark, "the call's media", |l| {
        l.contains("media instructions sent")
    });
    std::thread::sleep(Duration::from_secs(3));
    change();
    let ra = finish(caller);
    let rb = finish(callee);
    for (who, r) in [("alice", &ra), ("bob", &rb)] {
        assert_eq!(r.code, 0, "{what}: {who}: {}\n{}", r.json, r.stderr);
        assert_eq!(r.json["result"], "completed", "{what}: {who}: {}", r.json);
        let gap = r.json["received"]["max_gap_ms"]
            .as_f64()
            .unwrap_or(f64::MAX);
        assert!(
            gap <= 2000.0,
            "{what}: {who} heard nothing for {gap} ms: {}",
            r.json
        );
        let got = r.json["received"]["packets"].as_u64().unwrap_or(0);
        assert!(got >= 6 * 50, "{what}: {who} received only {got} packets");
        eprintln!("lab: {what}: {who}: longest silence {gap:.0} ms, {got} packets");
    }
    (ra, rb)
}

/// Alice has only IPv6, bob only IPv4: no direct path is planned across the families (no
/// candidate, no check); the gateway bridges both directions, audio both ways.
fn ipv6_only_calls_ipv4_only(lab: &Lab, gw: &Gateway) {
    lab.set(1, "open", "none");
    lab.set(2, "open", "none");
    lab.sh(&["family", "1", "v6"]);
    lab.sh(&["family", "2", "v4"]);
    let port = gw.control.rsplit(':').next().unwrap_or("7400");
    let server6 = format!("[2001:db8:31::1]:{port}");
    let mark = gw.log_len();
    let callee = spawn_phone_on(
        &strs(&lab.host("c2")),
        gw,
        "bob",
        &["--answer", "--duration", "4", "--wait", "20"],
    );
    gw.wait_online(mark, "bob");
    let caller = spawn_phone_at(
        &strs(&lab.host("c1")),
        gw,
        &server6,
        "alice",
        &["--call", "+15550002", "--duration", "3"],
    );
    let ra = finish(caller);
    let rb = finish(callee);
    for (who, r) in [("alice (IPv6)", &ra), ("bob (IPv4)", &rb)] {
        assert_eq!(r.code, 0, "v6/v4: {who}: {}\n{}", r.json, r.stderr);
        for dir in ["forward", "backward"] {
            assert_eq!(
                r.json["plan"][dir], "udp_via_gateway",
                "v6/v4: {who}: {}",
                r.json
            );
        }
        assert_eq!(r.json["paths"]["send_candidate"], false, "{who}");
        assert_eq!(r.json["received"]["lost"], 0, "{who}: {}", r.json);
        let got = r.json["received"]["packets"].as_u64().unwrap_or(0);
        assert!(got >= 100, "v6/v4: {who} received {got} packets");
    }
    assert!(
        ra.json["mapped"]
            .as_str()
            .unwrap_or("")
            .starts_with("[2001:db8:1::2]"),
        "{}",
        ra.json
    );
    for c in [1, 2] {
        let n = lab.counters(c);
        assert!(
            n["udp_out_gw"] >= USED && n["udp_in_gw"] >= USED,
            "client {c}: {n:?}"
        );
        assert!(
            n["udp_out_peer"] <= UNUSED && n["udp_in_peer"] <= UNUSED,
            "client {c}: {n:?}"
        );
    }
    eprintln!("lab: IPv6-only calls IPv4-only: bridged by the gateway both ways: ok");
}

/// Both clients behind NAT (media through the gateway); mid-call both NATs lose their
/// mappings and re-create them with new ports. The phones' keyed bindings re-bind the legs:
/// audio is back within 2 s.
fn nat_mapping_loss_mid_call(lab: &Lab, gw: &Gateway) {
    lab.set(1, "open", "masquerade");
    lab.set(2, "open", "masquerade");
    let (ra, rb) = mid_call(lab, gw, "NAT mapping loss", &|| {
        // Every UDP mapping forgotten (conntrack -D -p udp) and re-created with random ports;
        // the control connections (TCP) survive, as they do when a carrier NAT expires UDP.
        lab.sh(&["natloss", "1"]);
        lab.sh(&["natloss", "2"]);
    });
    for (who, r) in [("alice", &ra), ("bob", &rb)] {
        assert!(
            r.json["paths"]["nat_rebinds"].as_u64().unwrap_or(0) >= 1,
            "NAT mapping loss: {who} noticed its new mapping: {}",
            r.json
        );
    }
}

/// Both clients open: both directions go direct once proven; mid-call the direct path dies
/// (alice's router starts passing UDP only to and from the gateway). Consent expires and each
/// direction falls back to the gateway: at most 2 s of audio lost.
fn direct_path_cut_mid_call(lab: &Lab, gw: &Gateway) {
    lab.set(1, "open", "none");
    lab.set(2, "open", "none");
    let (ra, rb) = mid_call(lab, gw, "direct path cut", &|| {
        lab.sh(&["fw", "1", "portal"]);
    });
    for (who, r) in [("alice", &ra), ("bob", &rb)] {
        assert!(
            r.json["paths"]["went_direct_ms"].is_number(),
            "direct path cut: {who} went direct first: {}",
            r.json
        );
        assert_eq!(r.json["paths"]["fallbacks"], 1, "{who}: {}", r.json);
        assert_eq!(r.json["paths"]["send_direct"], false, "{who}: {}", r.json);
    }
    // After the cut the media went through the gateway.
    let c = lab.counters(1);
    assert!(c["udp_out_gw"] >= USED && c["udp_in_gw"] >= USED, "{c:?}");
}

/// Alice (open) starts a room with bob (TCP only) and carol (cannot receive UDP): everyone
/// hears both others.
fn conference_across_three_classes(lab: &Lab, gw: &Gateway) {
    lab.set(1, "open", "none");
    lab.set(2, "no-udp", "none");
    lab.set(3, "no-udp-in", "none");
    let dir = gw.dir.path();
    let clip = test_clip(dir, "speech-8k.wav", "conf.wav", 2.0);
    let mark = gw.log_len();
    let mut members = Vec::new();
    for (c, user) in [(2, "bob"), (3, "carol")] {
        members.push(spawn_phone_on(
            &strs(&lab.host(&format!("c{c}"))),
            gw,
            user,
            &[
                "--answer",
                "--play",
                clip.to_str().unwrap(),
                "--duration",
                "4",
                "--wait",
                "20",
            ],
        ));
        gw.wait_online(mark, user);
    }
    let organizer = spawn_phone_on(
        &strs(&lab.host("c1")),
        gw,
        "alice",
        &[
            "--conference",
            "+15550002,+15550003",
            "--play",
            clip.to_str().unwrap(),
            "--duration",
            "4",
        ],
    );
    let results: Vec<(&str, PhoneResult)> = vec![
        ("alice", finish(organizer)),
        ("bob", finish(members.remove(0))),
        ("carol", finish(members.remove(0))),
    ];
    for (who, r) in &results {
        assert_eq!(
            r.code, 0,
            "conference: {who} failed: {}\n{}",
            r.json, r.stderr
        );
        assert_eq!(
            r.json["received"]["ssrcs"], 2,
            "conference: {who} hears both others: {}",
            r.json
        );
        let got = r.json["received"]["packets"].as_u64().unwrap();
        assert!(got >= 2 * 100, "conference: {who} received {got} packets");
    }
    eprintln!("lab: conference of open, no-udp and no-udp-in clients: ok");
}

/// A call that starts direct; then bob's firewall starts dropping inbound UDP. Bob hears
/// nothing, says so, the gateway re-probes and re-plans (alice's audio now reaches bob over
/// TCP) — or, if it cannot, ends the call with a reason on both sides. Never silence with both
/// sides believing the call is up.
fn firewall_change_mid_call(lab: &Lab, gw: &Gateway) {
    lab.set(1, "open", "none");
    lab.set(2, "open", "none");
    let mark = gw.log_len();
    let callee = spawn_phone_on(
        &strs(&lab.host("c2")),
        gw,
        "bob",
        &["--answer", "--duration", "14", "--wait", "20"],
    );
    gw.wait_online(mark, "bob");
    let mark = gw.log_len();
    let caller = spawn_phone_on(
        &strs(&lab.host("c1")),
        gw,
        "alice",
        &["--call", "+15550002", "--duration", "12"],
    );
    gw.wait_log(mark, "the call's media", |l| {
        l.contains("media instructions sent")
    });
    std::thread::sleep(Duration::from_secs(2));
    // The call started through the gateway and went direct; now bob's inbound UDP stops.
    lab.sh(&["fw", "2", "no-udp-in"]);
    let ra = finish(caller);
    let rb = finish(callee);
    let replanned = rb.json["replans"].as_u64().unwrap_or(0) >= 1;
    if replanned {
        assert_eq!(ra.code, 0, "{}", ra.json);
        assert_eq!(
            rb.json["plan"]["forward"], "udp_in_tcp_out",
            "after the change alice's audio reaches bob over TCP: {}",
            rb.json
        );
        assert!(
            rb.json["received"]["tcp_packets"].as_u64().unwrap() >= USED,
            "{}",
            rb.json
        );
        eprintln!("lab: firewall change mid-call: re-planned, call recovered: ok");
    } else {
        for r in [&ra, &rb] {
            assert_eq!(r.json["hangup_reason"], "media_failed", "{}", r.json);
        }
        eprintln!("lab: firewall change mid-call: ended with media_failed on both sides: ok");
    }
}

/// The gateway behind a router doing 1:1 NAT (`GW_NAT=1`): clients reach it only at the public
/// address 172.31.0.1, which the router DNATs to the gateway's private 192.168.77.2. With
/// `--advertised-ipv4 172.31.0.1` every media address the gateway hands out is the public one,
/// and calls work on every plan: audio byte-exact, the routers' counters show the media going
/// to and from the public address. The same for IPv6 with `--advertised-ipv6`. (Without the flag the first call fails: "no valid answer
/// to the UDP media binding from the gateway at 192.168.77.2:7401".)
#[test]
fn gateway_behind_1to1_nat() {
    let Some(lab) = Lab::up_with("n", &[("GW_NAT", "1")]) else {
        return;
    };
    let gw = start_gateway_with(
        &lab,
        &[
            "--advertised-ipv4",
            GW_IP,
            "--advertised-ipv6",
            "2001:db8:31::1",
        ],
    );
    let party = |client, user, class, nat| Party {
        client,
        user,
        class,
        nat,
    };
    // UDP via the gateway (bob behind NAT) forward, direct back.
    call_case(
        &lab,
        &gw,
        &party(1, "alice", "open", "none"),
        &party(2, "bob", "open", "masquerade"),
    );
    // The gateway saw its private address: without the advertised one it would hand it out.
    assert!(
        gw.log_text().contains("local=192.168.77.2:7400"),
        "the gateway is behind the NAT:\n{}",
        gw.log_text()
    );
    // UDP via the gateway both ways.
    call_case(
        &lab,
        &gw,
        &party(1, "alice", "open", "masquerade"),
        &party(2, "bob", "open", "symmetric"),
    );
    // TCP in, UDP out.
    call_case(
        &lab,
        &gw,
        &party(1, "alice", "no-udp-out", "none"),
        &party(2, "bob", "open", "masquerade"),
    );
    // UDP in, TCP out.
    call_case(
        &lab,
        &gw,
        &party(1, "alice", "open", "masquerade"),
        &party(2, "bob", "no-udp-in", "none"),
    );
    // TCP both ways.
    call_case(
        &lab,
        &gw,
        &party(1, "alice", "no-udp", "none"),
        &party(2, "bob", "no-udp", "masquerade"),
    );
    // IPv6 is NATed 1:1 too (2001:db8:31::1 to fd77::2): an IPv6-only client is told the
    // public IPv6 address, an IPv4-only one the public IPv4 address, and the gateway bridges
    // them. (Last: it takes the clients' other address family away.)
    ipv6_only_calls_ipv4_only(&lab, &gw);
    assert!(
        gw.log_text().contains("local=[fd77::2]:7400"),
        "the IPv6 client reached the gateway through the NAT:\n{}",
        gw.log_text()
    );
    drop(gw);
}

/// A test CA and a certificate for the gateway's address 172.31.0.1 (PEM files in `dir`):
/// (CA, certificate, key).
fn gateway_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "voxgate lab CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![GW_IP.to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// The Squid-only class: client 1's router forwards nothing at all; its only way out is a real
/// Squid on the router that allows CONNECT to port 443 only. The gateway serves everything on
/// 443 (`[single_port]`, TLS control and TLS TCP media). A call from there to an open client
/// (client 2) works both ways, audio byte-exact; the probe reports the proxied client as UDP
/// blocked both ways and the plan gives it TCP through the gateway both ways (its peer on UDP);
/// the router's counters show nothing but TCP to the proxy; and the proxy refuses a tunnel to
/// the plain control port.
#[test]
fn squid_is_the_only_way_out() {
    let Some(lab) = Lab::up_with("s", &[]) else {
        return;
    };
    let squid = Command::new("squid")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !squid {
        eprintln!("\n*** SQUID LAB NOT RUN: squid is not installed (apt-get install squid) ***\n");
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"),
            "CI=true: squid must be installed (scripts/test-all installs it)"
        );
        return;
    }
    let pki_dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = gateway_pki(pki_dir.path());
    let engine = match voxgate::server::ktls::available() {
        Ok(()) => "kernel",
        Err(e) => {
            eprintln!("lab: no kernel TLS here ({e}): the shard runs the TLS records itself");
            "shard"
        }
    };
    let cfg = pki_dir.path().join("voxgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\ncontrol_port = 7443\n\
             [single_port]\nport = 443\nmedia = \"tls\"\ntls_engine = \"{engine}\"\n",
            cert.to_str().unwrap(),
            key.to_str().unwrap()
        ),
    )
    .unwrap();
    let gw = start_gateway_with(&lab, &["--config", cfg.to_str().unwrap()]);
    lab.set(1, "proxy-only", "none");
    lab.set(2, "open", "none");
    lab.sh(&["squid", "1"]);
    lab.sh(&["reset", "1"]);
    let server = format!("tls://{GW_IP}:443");
    let proxy = "http://10.1.0.1:3128";
    let ca_arg = ca.to_str().unwrap();
    let dir = gw.dir.path();
    let a_in = test_clip(dir, "speech-8k.wav", "sq-a-in.wav", 1.2);
    let b_in = test_clip(dir, "reply-8k.wav", "sq-b-in.wav", 1.2);
    let a_rec = dir.join("sq-a-rec.wav");
    let b_rec = dir.join("sq-b-rec.wav");
    let mark = gw.log_len();
    let callee = spawn_phone_at(
        &strs(&lab.host("c2")),
        &gw,
        &server,
        "bob",
        &[
            "--ca",
            ca_arg,
            "--answer",
            "--play",
            b_in.to_str().unwrap(),
            "--record",
            b_rec.to_str().unwrap(),
            "--wait",
            "30",
        ],
    );
    gw.wait_online(mark, "bob");
    let caller = spawn_phone_at(
        &strs(&lab.host("c1")),
        &gw,
        &server,
        "alice",
        &[
            "--ca",
            ca_arg,
            "--proxy",
            proxy,
            "--call",
            "+15550002",
            "--play",
            a_in.to_str().unwrap(),
            "--record",
            a_rec.to_str().unwrap(),
        ],
    );
    let ra = finish(caller);
    let rb = finish(callee);
    for (who, r) in [("alice", &ra), ("bob", &rb)] {
        assert_eq!(r.code, 0, "squid: {who} failed: {}\n{}", r.json, r.stderr);
        assert_eq!(r.json["received"]["lost"], 0, "squid: {who}: {}", r.json);
    }
    // The probe: the proxied client has no UDP either way; the open one has both.
    let (ca_, cb) = (caps_of(&ra), caps_of(&rb));
    assert!(!ca_.send_udp && !ca_.recv_udp, "alice's probe: {ca_:?}");
    assert!(cb.send_udp && cb.recv_udp, "bob's probe: {cb:?}");
    // TCP through the gateway both ways for alice; bob stays on UDP.
    for r in [&ra, &rb] {
        assert_eq!(r.json["plan"]["forward"], "tcp_in_udp_out", "{}", r.json);
        assert_eq!(r.json["plan"]["backward"], "udp_in_tcp_out", "{}", r.json);
    }
    for (sent, rec, what) in [
        (&a_in, &b_rec, "bob hears alice"),
        (&b_in, &a_rec, "alice hears bob"),
    ] {
        let want = ulaw_round_trip_padded(&wav::read(sent).unwrap());
        let got = wav::read(rec).unwrap();
        assert!(
            got.len() >= want.len() && got[..want.len()] == want[..],
            "squid: {what}: the recording differs from what was sent"
        );
    }
    // Alice's TCP media came through the single port over TLS.
    let handed: Vec<String> = gw
        .log_text()
        .lines()
        .skip(mark)
        .filter(|l| l.contains("media connection handed to its shard"))
        .map(str::to_owned)
        .collect();
    assert!(
        handed.iter().any(|l| l.contains("172.31.0.11")),
        "alice's media came in from the proxy's address: {handed:?}"
    );
    // The router saw nothing but TCP to the proxy: nothing forwarded, no other traffic to it.
    let c = lab.counters(1);
    eprintln!("lab: squid: router 1 counters {c:?}");
    assert!(
        c["tcp_to_proxy"] >= USED,
        "the call went through the proxy: {c:?}"
    );
    for name in [
        "lan_forwarded",
        "lan_to_router_other",
        "udp_out_gw",
        "udp_out_peer",
        "tcp_out_gw",
        "udp_in_gw",
        "udp_in_peer",
        "tcp_in_gw",
    ] {
        assert_eq!(c[name], 0, "{name}: {c:?}");
    }
    // The proxy's own log: tunnels to 443 only.
    let log = std::fs::read_to_string(format!("/run/{}-squid-1/access.log", lab.prefix))
        .unwrap_or_default();
    assert!(log.contains(&format!("CONNECT {GW_IP}:443")), "{log}");
    // And it refuses a tunnel to the plain control port.
    let out = common::run_with_stdin(
        Command::new("ip")
            .args(["netns", "exec", &format!("{}c1", lab.prefix)])
            .args([
                common::BIN,
                "probe",
                "--server",
                &format!("{GW_IP}:7400"),
                "--user",
                "alice",
                "--password-stdin",
                "--proxy",
                proxy,
            ]),
        &format!("{}\n", common::password("alice")),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("403"), "the proxy's refusal is named: {said}");
    drop(gw);
}
