//! The cargo-fuzz targets (`fuzz/`) run on stable in every test run, for a bounded time: each
//! target gets its seeds (`voxgate::wire::fuzz::seeds`), the corpus files under
//! `fuzz/corpus/<target>/` (where crash reproducers go too), and random mutations of them
//! (bit flips, interesting bytes and 16-bit lengths, inserts, deletes, splices, truncation),
//! through the very function the libFuzzer target calls. Not coverage-guided (that is what
//! `cargo +nightly fuzz run <target>` adds), but it runs everywhere.
//!
//! `VOXGATE_FUZZ_SECS` (default 2) bounds each target's time, `VOXGATE_FUZZ_SEED` repeats a
//! run, `VOXGATE_FUZZ_WRITE_SEEDS=1` also writes the seeds into `fuzz/corpus/<target>/` (what
//! `fuzz/run` does before a libFuzzer run). A failing input is written to
//! `target/fuzz-failures/` and named in the failure.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use voxgate::wire::fuzz::{TARGETS, seeds};

/// Most iterations per target, whatever the time bound.
const MAX_ITERATIONS: u64 = 300_000;
/// Largest input a mutation may grow.
const MAX_INPUT: usize = 4096;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn mutate(rng: &mut StdRng, pool: &[Vec<u8>], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&pool[rng.random_range(0..pool.len())]);
    for _ in 0..rng.random_range(1..=4) {
        let len = out.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = [0, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'}'][rng.random_range(0..8)];
            }
            2 if len > 1 => {
                // A 16-bit big-endian length (RFC 4571, STUN, control frames) set to an edge.
                let i = rng.random_range(0..len - 1);
                let v: u16 = [0, 1, 2, 12, 20, 0x7fff, 0xffff, len as u16][rng.random_range(0..8)];
                out[i..i + 2].copy_from_slice(&v.to_be_bytes());
            }
            3 if len < MAX_INPUT => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16).min(MAX_INPUT - len);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len.min(i + 32));
                out.drain(i..j);
            }
            5 if len > 0 && len < MAX_INPUT => {
                // Duplicate a range (repeated attributes, frames, fields).
                let i = rng.random_range(0..len);
                let j = rng.random_range(i..=len.min(i + 64));
                let copy = out[i..j].to_vec();
                let at = rng.random_range(0..=len);
                out.splice(at..at, copy.into_iter().take(MAX_INPUT - len));
            }
            6 => {
                // Splice: this input's head, another's tail.
                let other = &pool[rng.random_range(0..pool.len())];
                let i = rng.random_range(0..=len);
                let j = rng.random_range(0..=other.len());
                out.truncate(i);
                out.extend_from_slice(&other[j..]);
                out.truncate(MAX_INPUT);
            }
            _ if len > 0 => out.truncate(rng.random_range(0..len)),
            _ => out.push(rng.random()),
        }
    }
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations() {
    let secs: f64 = std::env::var("VOXGATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let seed: u64 = std::env::var("VOXGATE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("VOXGATE_FUZZ_SEED={seed}");
    // Failures are reported below, with the input: keep the default hook's noise out.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for &(name, target) in TARGETS {
        let mut rng = StdRng::seed_from_u64(seed ^ name.len() as u64);
        let mut pool = seeds(name);
        assert!(!pool.is_empty(), "{name}: no seeds");
        if std::env::var_os("VOXGATE_FUZZ_WRITE_SEEDS").is_some() {
            // fuzz/run: the seeds as libFuzzer's starting corpus.
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus")
                .join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, s) in pool.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
            }
        }
        let files = corpus(name);
        let from_files = files.len();
        pool.extend(files);
        let run = |input: &[u8]| catch_unwind(AssertUnwindSafe(|| target(input)));
        let mut failed = pool.iter().find(|i| run(i).is_err()).cloned();
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let mut input = Vec::with_capacity(MAX_INPUT);
        let mut n = 0u64;
        while failed.is_none() && n < MAX_ITERATIONS && Instant::now() < deadline {
            mutate(&mut rng, &pool, &mut input);
            if run(&input).is_err() {
                failed = Some(input.clone());
            }
            n += 1;
        }
        println!(
            "{name}: {} seeds, {from_files} corpus files, {n} mutated inputs",
            pool.len() - from_files
        );
        if let Some(bad) = failed {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{name}-{seed}"));
            let _ = std::fs::write(&path, &bad);
            failures.push(format!(
                "{name}: panicked on {} bytes (saved to {}; reproduce with \
                 `cargo +nightly fuzz run {name} {}` or copy it into fuzz/corpus/{name}/): {:02x?}",
                bad.len(),
                path.display(),
                path.display(),
                &bad[..bad.len().min(64)]
            ));
        }
    }
    std::panic::set_hook(hook);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The mutations leave the seeds behind: other message types, truncated and grown inputs (a
/// quiet run must mean the parsers held, not that they only saw valid messages).
#[test]
fn mutations_reach_beyond_the_seeds() {
    let mut rng = StdRng::seed_from_u64(1);
    let pool = seeds("stun");
    let mut input = Vec::new();
    let mut changed_type = false;
    let mut shorter = false;
    let mut longer = false;
    for _ in 0..10_000 {
        mutate(&mut rng, &pool, &mut input);
        changed_type |= input.len() >= 2 && pool.iter().all(|s| s.get(..2) != input.get(..2));
        shorter |= input.len() < 20;
        longer |= pool.iter().all(|s| input.len() > s.len());
    }
    assert!(changed_type && shorter && longer);
}
