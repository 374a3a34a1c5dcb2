//! A phone's gateways: the list it may log in to, and moving to the next one when its gateway
//! is gone (failover).
//!
//! A list is written as `--server A,B` and/or repeated `--gateway A --gateway B,C`. Each
//! entry is a control address (`HOST[:PORT]`, `tls://HOST[:PORT]`) or a DNS SRV name
//! (`_voxgate._tcp.example.net`, or `tls://_voxgate._tcp.example.net`): the name is
//! resolved (hickory-resolver: the system's `/etc/resolv.conf`, or the name server given)
//! and its targets take its place in the list, lowest priority first and, within one
//! priority, in a random order weighted by the records' weights (RFC 2782). A name that does
//! not resolve is left out with a warning as long as some other entry remains.
//!
//! [`connect_any`] logs in to the first entry that takes it, starting at a given position and
//! going round the list: a gateway that cannot be reached (refused, reset, timed out, closed)
//! or that says `unavailable` (draining, at capacity, its directory down) is skipped; a
//! refusal that would be the same everywhere (wrong password, too many attempts, the account
//! revoked) ends the attempt at once. After a whole round without success it waits (100 ms,
//! doubling to 2 s) and goes round again, re-resolving SRV names, until its deadline.
//!
//! Nothing here keeps state between rounds beyond the list: which gateway is "next" is the
//! caller's position in it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::session::{ClientError, Event, Phone, PhoneOptions};
use crate::wire::control::ErrorCode;

/// Most entries a list may hold (after SRV expansion).
pub const MAX_GATEWAYS: usize = 32;
/// Longest entry, in bytes.
pub const MAX_ENTRY: usize = 300;
/// First pause after a round in which no gateway took the log-in; doubles up to [`MAX_PAUSE`].
pub const FIRST_PAUSE: Duration = Duration::from_millis(100);
pub const MAX_PAUSE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GatewayListError {
    #[error("no gateway given: use --server HOST[:PORT] or --gateway HOST[:PORT] (repeatable)")]
    Empty,
    #[error("more than {MAX_GATEWAYS} gateways")]
    TooMany,
    #[error(
        "bad gateway {0:?}: expected HOST[:PORT], tls://HOST[:PORT] or an SRV name _service._tcp.DOMAIN"
    )]
    Bad(String),
    #[error("none of the gateways could be resolved: {0}")]
    Unresolved(String),
}

/// One entry as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A control address, as given to [`Phone::connect`] (`HOST[:PORT]` or `tls://…`).
    Address(String),
    /// A DNS SRV name; `tls` when written `tls://_…`.
    Srv { name: String, tls: bool },
}

impl Entry {
    fn parse(s: &str) -> Result<Entry, GatewayListError> {
        let bad = || GatewayListError::Bad(s.chars().take(MAX_ENTRY).collect());
        let t = s.trim();
        if t.is_empty() || t.len() > MAX_ENTRY || t.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad());
        }
        let (rest, tls) = super::tls::strip_scheme(t);
        if rest.starts_with('_') {
            // _service._proto.domain: two labels starting with '_' and a domain.
            let labels: Vec<&str> = rest.trim_end_matches('.').split('.').collect();
            let ok = labels.len() >= 3
                && labels[0].len() > 1
                && labels[1].starts_with('_')
                && labels[1].len() > 1
                && labels.iter().all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                });
            if !ok {
                return Err(bad());
            }
            return Ok(Entry::Srv {
                name: rest.to_owned(),
                tls,
            });
        }
        super::session::parse_server(rest).map_err(|_| bad())?;
        Ok(Entry::Address(t.to_owned()))
    }
}

/// The gateways as written: entries of `--server` and `--gateway`, comma lists split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayList {
    pub entries: Vec<Entry>,
}

impl GatewayList {
    /// Parses every item (each may be a comma list); empty items of a comma list are errors.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, GatewayListError> {
        let mut entries = Vec::new();
        for item in items {
            for part in item.split(',') {
                if entries.len() >= MAX_GATEWAYS {
                    return Err(GatewayListError::TooMany);
                }
                entries.push(Entry::parse(part)?);
            }
        }
        if entries.is_empty() {
            return Err(GatewayListError::Empty);
        }
        Ok(GatewayList { entries })
    }

    /// The control addresses to try, in order: SRV names replaced by their targets.
    /// `resolver`: the name server to ask (default: the system's).
    pub async fn resolve(
        &self,
        resolver: Option<SocketAddr>,
    ) -> Result<Vec<String>, GatewayListError> {
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for e in &self.entries {
            match e {
                Entry::Address(a) => out.push(a.clone()),
                Entry::Srv { name, tls } => match lookup_srv(name, resolver).await {
                    Ok(targets) => {
                        for t in targets {
                            out.push(if *tls { format!("tls://{t}") } else { t });
                        }
                    }
                    Err(why) => {
                        tracing::warn!(srv = %name, "cannot resolve: {why}");
                        problems.push(format!("{name}: {why}"));
                    }
                },
            }
        }
        out.dedup();
        out.truncate(MAX_GATEWAYS);
        if out.is_empty() {
            return Err(GatewayListError::Unresolved(problems.join("; ")));
        }
        Ok(out)
    }
}

/// An SRV record's target as the list uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrvTarget {
    pub priority: u16,
    pub weight: u16,
    pub host: String,
    pub port: u16,
}

/// RFC 2782 order: by priority; within a priority, repeatedly pick one at random with
/// probability proportional to its weight (weight 0 records get a small chance, listed last
/// when all else is equal). A target of "." means "no service here": left out.
pub fn order_srv(mut targets: Vec<SrvTarget>, rng: &mut impl rand::Rng) -> Vec<String> {
    targets.retain(|t| t.host != "." && !t.host.is_empty() && t.port != 0);
    targets.sort_by_key(|t| t.priority);
    let mut out = Vec::with_capacity(targets.len());
    let mut i = 0;
    while i < targets.len() {
        let p = targets[i].priority;
        let mut group: Vec<SrvTarget> = targets[i..]
            .iter()
            .take_while(|t| t.priority == p)
            .cloned()
            .collect();
        i += group.len();
        // Zero weights first in the group, as RFC 2782 asks before the running sums.
        group.sort_by_key(|t| t.weight != 0);
        while !group.is_empty() {
            let total: u32 = group.iter().map(|t| u32::from(t.weight)).sum();
            let pick = rng.random_range(0..=total);
            let mut run = 0u32;
            let k = group
                .iter()
                .position(|t| {
                    run += u32::from(t.weight);
                    run >= pick
                })
                .unwrap_or(0);
            let t = group.remove(k);
            let host = t.host.trim_end_matches('.');
            out.push(match host.parse::<std::net::Ipv6Addr>() {
                Ok(_) => format!("[{host}]:{}", t.port),
                Err(_) => format!("{host}:{}", t.port),
            });
        }
    }
    out
}

/// The targets of SRV name `name`, ordered (see [`order_srv`]).
pub async fn lookup_srv(name: &str, server: Option<SocketAddr>) -> Result<Vec<String>, String> {
    use hickory_resolver::TokioResolver;
    use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
    use hickory_resolver::name_server::TokioConnectionProvider;
    let resolver = match server {
        Some(s) => {
            let group = NameServerConfigGroup::from_ips_clear(&[s.ip()], s.port(), true);
            let mut b = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], group),
                TokioConnectionProvider::default(),
            );
            b.options_mut().timeout = Duration::from_secs(2);
            b.options_mut().attempts = 2;
            b.build()
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("no system resolver configuration: {e}"))?
            .build(),
    };
    // The name is absolute: no search domains.
    let fqdn = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    let found = resolver
        .srv_lookup(fqdn.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let targets: Vec<SrvTarget> = found
        .iter()
        .take(MAX_GATEWAYS)
        .map(|r| SrvTarget {
            priority: r.priority(),
            weight: r.weight(),
            host: r.target().to_utf8(),
            port: r.port(),
        })
        .collect();
    let ordered = order_srv(targets, &mut rand::rng());
    if ordered.is_empty() {
        return Err("no usable SRV records".into());
    }
    Ok(ordered)
}

/// Whether a failed log-in at one gateway may succeed at another.
pub fn worth_another_gateway(e: &ClientError) -> bool {
    match e {
        ClientError::Refused { code, .. } => !matches!(
            code,
            ErrorCode::AuthFailed | ErrorCode::RateLimited | ErrorCode::Revoked
        ),
        ClientError::BadServer(_) | ClientError::Auth(_) => false,
        _ => true,
    }
}

/// A logged-in phone and where: `index` in the resolved list, `server` its entry.
pub struct Connected {
    pub phone: Phone,
    pub events: mpsc::Receiver<Event>,
    pub index: usize,
    pub server: String,
}

/// What a log-in needs, whichever gateway takes it.
pub struct Login<'a> {
    pub list: &'a GatewayList,
    /// The DNS server for SRV names (default: the system's).
    pub resolver: Option<SocketAddr>,
    pub user: &'a str,
    pub password: &'a str,
    pub opts: &'a PhoneOptions,
}

/// Logs in to the first gateway of the list that takes it, starting at position `start` and
/// going round; `prefer` entries (a `going_away`'s `gateways`) are tried first. With a
/// `deadline` it goes round again (pausing [`FIRST_PAUSE`], doubling to [`MAX_PAUSE`]) until
/// then; without, one round. Returns the last error; stops at once on a refusal no other
/// gateway would lift ([`worth_another_gateway`]).
pub async fn connect_any(
    login: &Login<'_>,
    start: usize,
    prefer: &[String],
    deadline: Option<Instant>,
) -> Result<Connected, ClientError> {
    let mut pause = FIRST_PAUSE;
    let mut last: Option<ClientError> = None;
    loop {
        let resolved = match login.list.resolve(login.resolver).await {
            Ok(r) => r,
            Err(e) => {
                last = Some(ClientError::Resolve {
                    server: "the gateway list".into(),
                    source: std::io::Error::other(e.to_string()),
                });
                Vec::new()
            }
        };
        let n = resolved.len();
        let order = prefer
            .iter()
            .filter(|p| Entry::parse(p).is_ok_and(|e| matches!(e, Entry::Address(_))))
            .take(MAX_GATEWAYS)
            .map(|p| {
                let i = resolved.iter().position(|r| r == p);
                (i.unwrap_or(start % n.max(1)), p.clone())
            })
            .chain((0..n).map(|k| {
                let i = (start + k) % n;
                (i, resolved[i].clone())
            }));
        for (index, server) in order {
            let mut o = login.opts.clone();
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                o.timeout = o.timeout.min(left);
            }
            match Phone::connect(&server, login.user, login.password, o).await {
                Ok((phone, events)) => {
                    tracing::info!(gateway = %server, "logged in");
                    return Ok(Connected {
                        phone,
                        events,
                        index,
                        server,
                    });
                }
                Err(e) if worth_another_gateway(&e) => {
                    if n > 1 || !prefer.is_empty() || deadline.is_some() {
                        tracing::warn!(gateway = %server, "log-in failed, trying the next gateway: {e}");
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        let give_up = ClientError::Timeout("a gateway to take the log-in");
        let Some(d) = deadline else {
            return Err(last.unwrap_or(give_up));
        };
        if Instant::now() + pause >= d {
            return Err(last.unwrap_or(give_up));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Wall-clock milliseconds since the Unix epoch (for reports read by other processes).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lists_parse_from_every_form() {
        let l = GatewayList::parse(["a.example:7400,b.example", "tls://c.example:7443"]).unwrap();
        assert_eq!(
            l.entries,
            vec![
                Entry::Address("a.example:7400".into()),
                Entry::Address("b.example".into()),
                Entry::Address("tls://c.example:7443".into()),
            ]
        );
        let l = GatewayList::parse(["_voxgate._tcp.example.net", "tls://_voxgate._tcp.x.org."])
            .unwrap();
        assert_eq!(
            l.entries,
            vec![
                Entry::Srv {
                    name: "_voxgate._tcp.example.net".into(),
                    tls: false
                },
                Entry::Srv {
                    name: "_voxgate._tcp.x.org.".into(),
                    tls: true
                },
            ]
        );
        for bad in [
            "",
            "a,,b",
            "a b",
            "_voxgate.example",
            "_x._tcp.",
            "host:notaport",
        ] {
            let e = GatewayList::parse([bad]).unwrap_err();
            assert!(
                matches!(e, GatewayListError::Bad(_) | GatewayListError::Empty),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            GatewayList::parse(std::iter::empty()),
            Err(GatewayListError::Empty)
        );
        let many = vec!["h:1"; MAX_GATEWAYS + 1].join(",");
        assert_eq!(
            GatewayList::parse([many.as_str()]),
            Err(GatewayListError::TooMany)
        );
    }

    fn t(priority: u16, weight: u16, host: &str, port: u16) -> SrvTarget {
        SrvTarget {
            priority,
            weight,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn srv_targets_go_by_priority_then_weight() {
        let mut rng = rand::rng();
        let mut first_b = 0;
        for _ in 0..2000 {
            let o = order_srv(
                vec![
                    t(20, 0, "z.example.", 7400),
                    t(10, 10, "a.example.", 7400),
                    t(10, 90, "b.example.", 7401),
                    t(5, 0, ".", 0),
                    t(30, 1, "::1", 7402),
                ],
                &mut rng,
            );
            assert_eq!(o.len(), 4, "{o:?}");
            assert_eq!(o[2], "z.example:7400");
            assert_eq!(o[3], "[::1]:7402");
            first_b += usize::from(o[0] == "b.example:7401");
        }
        // Weight 90 against 10: b first about 90 % of the time.
        assert!((1600..=1950).contains(&first_b), "{first_b}");
    }

    #[test]
    fn only_refusals_that_hold_everywhere_stop_the_round() {
        let refused = |code| ClientError::Refused {
            code,
            message: String::new(),
        };
        assert!(worth_another_gateway(&refused(ErrorCode::Unavailable)));
        assert!(worth_another_gateway(&refused(ErrorCode::Timeout)));
        assert!(worth_another_gateway(&ClientError::Connect {
            server: "x".into(),
            source: std::io::ErrorKind::ConnectionRefused.into()
        }));
        assert!(worth_another_gateway(&ClientError::GatewayNotAuthenticated));
        assert!(!worth_another_gateway(&refused(ErrorCode::AuthFailed)));
        assert!(!worth_another_gateway(&refused(ErrorCode::RateLimited)));
        assert!(!worth_another_gateway(&refused(ErrorCode::Revoked)));
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panic(s in "\\PC{0,400}") {
            match GatewayList::parse([s.as_str()]) {
                Ok(l) => prop_assert!(!l.entries.is_empty() && l.entries.len() <= MAX_GATEWAYS),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }

        #[test]
        fn srv_ordering_keeps_every_usable_target(
            ts in proptest::collection::vec((0u16..4, 0u16..100, 1u16..), 0..20)
        ) {
            let targets: Vec<SrvTarget> = ts
                .iter()
                .enumerate()
                .map(|(i, (p, w, port))| t(*p, *w, &format!("h{i}.example."), *port))
                .collect();
            let o = order_srv(targets.clone(), &mut rand::rng());
            prop_assert_eq!(o.len(), targets.len());
            // Priorities never go down along the list.
            let prio = |s: &str| {
                let i: usize = s[1..s.find('.').unwrap()].parse().unwrap();
                targets[i].priority
            };
            for w in o.windows(2) {
                prop_assert!(prio(&w[0]) <= prio(&w[1]));
            }
        }
    }
}
