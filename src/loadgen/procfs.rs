//! What the relay under test costs, read from `/proc`: CPU time (the ns-precision sum of
//! `/proc/<pid>/task/*/schedstat`, and utime+stime from `/proc/<pid>/stat` in clock ticks)
//! and resident memory (`VmRSS` of `/proc/<pid>/status`). The parsers are pure.

use std::path::Path;

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// Sum over the live threads of the time spent on a CPU, ns (schedstat field 1).
    pub schedstat_ns: u64,
    /// utime + stime of the whole process, clock ticks.
    pub stat_ticks: u64,
    pub rss_kib: u64,
}

/// The first field of a `schedstat` line: time on a CPU, ns.
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line; the command name may hold
/// spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": field 3 (state) is f[0], so field n is f[n - 3].
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in KiB from `/proc/<pid>/status`.
pub fn parse_vmrss_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Busy and total ticks of CPU `cpu` from `/proc/stat` (busy: everything but idle and
/// iowait).
pub fn parse_cpu_ticks(text: &str, cpu: usize) -> Option<(u64, u64)> {
    let name = format!("cpu{cpu}");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some((total - v[3] - v[4], total))
}

/// Busy ticks of CPU `cpu` now.
pub fn cpu_busy_ticks(cpu: usize) -> Option<u64> {
    parse_cpu_ticks(&std::fs::read_to_string("/proc/stat").ok()?, cpu).map(|(b, _)| b)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Reads `pid` (0: this process).
pub fn sample(pid: u32) -> std::io::Result<ProcSample> {
    let base = if pid == 0 {
        Path::new("/proc/self").to_path_buf()
    } else {
        Path::new("/proc").join(pid.to_string())
    };
    let mut s = ProcSample::default();
    // At most 4096 threads are read: the relays under test have a handful.
    for e in std::fs::read_dir(base.join("task"))?.take(4096).flatten() {
        if let Ok(t) = std::fs::read_to_string(e.path().join("schedstat")) {
            s.schedstat_ns += parse_schedstat(&t).unwrap_or(0);
        }
    }
    s.stat_ticks = parse_stat_ticks(&std::fs::read_to_string(base.join("stat"))?).unwrap_or(0);
    s.rss_kib = parse_vmrss_kib(&std::fs::read_to_string(base.join("status"))?).unwrap_or(0);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(parse_schedstat("123456789 2000 31\n"), Some(123_456_789));
        assert_eq!(parse_schedstat(""), None);
        let stat = "4242 (voxgate (shard) x) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    1500 250 0 0 20 0 3 0 100 1000000 300 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(1750));
        assert_eq!(parse_stat_ticks("1 (x) S"), None);
        let status = "Name:\tvoxgate\nVmPeak:\t  9000 kB\nVmRSS:\t   5120 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kib(status), Some(5120));
        assert_eq!(parse_vmrss_kib("Name: x\n"), None);
        let stat =
            "cpu  10 0 10 100 5 0 0 0 0 0\ncpu0 4 1 3 50 2 1 1 0 0 0\ncpu1 6 0 7 50 3 0 0 0\n";
        assert_eq!(parse_cpu_ticks(stat, 0), Some((10, 62)));
        assert_eq!(parse_cpu_ticks(stat, 1), Some((13, 66)));
        assert_eq!(parse_cpu_ticks(stat, 2), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(0).unwrap();
        assert!(s.rss_kib > 0);
        assert!(s.schedstat_ns > 0 || s.stat_ticks > 0);
    }
}
