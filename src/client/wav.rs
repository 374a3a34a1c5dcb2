//! WAV files for the softphone: what it plays (`--play`) and what it records (`--record`).
//!
//! Only one format is accepted, the one a G.711 call carries: 8000 Hz, mono, 16-bit PCM.
//! Anything else is refused with an error that names the file and says what it holds, rather
//! than converted: a resampler or a down-mix would change the audio, and the recording
//! could then no longer be compared sample for sample with what was sent. Reading is bounded
//! ([`MAX_SAMPLES`]). Uses `hound`; no other IO.

use std::path::{Path, PathBuf};

/// The sample rate of a G.711 call.
pub const SAMPLE_RATE: u32 = 8000;
/// Longest file accepted for playing: one hour at 8 kHz (58 MB in memory).
pub const MAX_SAMPLES: u64 = 3600 * SAMPLE_RATE as u64;

#[derive(Debug, thiserror::Error)]
pub enum WavError {
    #[error("cannot read {path}: {source}", path = path.display())]
    Read { path: PathBuf, source: hound::Error },
    #[error(
        "{path} is {rate} Hz, {channels} channel{s}, {bits}-bit{float}; voxgate phone plays 8000 Hz mono 16-bit PCM WAV",
        path = path.display(),
        s = if *channels == 1 { "" } else { "s" },
        float = if *float { " float" } else { "" }
    )]
    Format {
        path: PathBuf,
        rate: u32,
        channels: u16,
        bits: u16,
        float: bool,
    },
    #[error("{path} holds {samples} samples; at most {MAX_SAMPLES} (one hour) can be played", path = path.display())]
    TooLong { path: PathBuf, samples: u64 },
    #[error("cannot write {path}: {source}", path = path.display())]
    Write { path: PathBuf, source: hound::Error },
}

/// The only spec read and written.
pub fn spec() -> hound::WavSpec {
    hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    }
}

/// Reads an 8000 Hz mono 16-bit PCM WAV file; any other format is refused with a message that
/// names the file and its format.
pub fn read(path: &Path) -> Result<Vec<i16>, WavError> {
    let read_err = |source| WavError::Read {
        path: path.to_owned(),
        source,
    };
    let reader = hound::WavReader::open(path).map_err(read_err)?;
    let s = reader.spec();
    if s != spec() {
        return Err(WavError::Format {
            path: path.to_owned(),
            rate: s.sample_rate,
            channels: s.channels,
            bits: s.bits_per_sample,
            float: s.sample_format == hound::SampleFormat::Float,
        });
    }
    let samples = u64::from(reader.duration());
    if samples > MAX_SAMPLES {
        return Err(WavError::TooLong {
            path: path.to_owned(),
            samples,
        });
    }
    reader
        .into_samples::<i16>()
        .take(MAX_SAMPLES as usize)
        .collect::<Result<Vec<i16>, _>>()
        .map_err(read_err)
}

/// An open recording: created up front (so a path that cannot be written fails before the
/// call, not after it), filled at the end.
pub struct WavOut {
    path: PathBuf,
    writer: hound::WavWriter<std::io::BufWriter<std::fs::File>>,
}

impl WavOut {
    /// Creates (truncates) `path` as an 8000 Hz mono 16-bit PCM WAV file.
    pub fn create(path: &Path) -> Result<WavOut, WavError> {
        let writer = hound::WavWriter::create(path, spec()).map_err(|source| WavError::Write {
            path: path.to_owned(),
            source,
        })?;
        Ok(WavOut {
            path: path.to_owned(),
            writer,
        })
    }

    /// Appends `samples` and finishes the file (header lengths).
    pub fn finish(mut self, samples: &[i16]) -> Result<(), WavError> {
        let err = |source| WavError::Write {
            path: self.path.clone(),
            source,
        };
        let mut w = self.writer.get_i16_writer(samples.len() as u32);
        for &s in samples {
            w.write_sample(s);
        }
        w.flush().map_err(err)?;
        self.writer.finalize().map_err(err)
    }
}

/// Writes `samples` as an 8000 Hz mono 16-bit PCM WAV file.
pub fn write(path: &Path, samples: &[i16]) -> Result<(), WavError> {
    WavOut::create(path)?.finish(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    #[test]
    fn reads_the_test_speech() {
        let s = read(&data("speech-8k.wav")).expect("8 kHz mono 16-bit");
        // 9.6 s of speech.
        assert!((9 * 8000..10 * 8000).contains(&s.len()), "{}", s.len());
        assert!(s.iter().any(|&x| x.unsigned_abs() > 1000), "not silence");
    }

    #[test]
    fn refuses_other_formats_naming_the_file() {
        let e = read(&data("stereo-16k.wav")).expect_err("16 kHz stereo is refused");
        assert!(matches!(e, WavError::Format { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with(env!("CARGO_MANIFEST_DIR")), "{msg}");
        // Tests run in the package root, so the path as a user would type it:
        assert_eq!(
            read(Path::new("tests/data/stereo-16k.wav"))
                .expect_err("refused")
                .to_string(),
            "tests/data/stereo-16k.wav is 16000 Hz, 2 channels, 16-bit; voxgate phone plays 8000 Hz mono 16-bit PCM WAV"
        );
        assert!(
            msg.ends_with(
                "stereo-16k.wav is 16000 Hz, 2 channels, 16-bit; voxgate phone plays 8000 Hz mono 16-bit PCM WAV"
            ),
            "{msg}"
        );
        let e = read(Path::new("/nonexistent/x.wav")).expect_err("missing file");
        assert!(e.to_string().contains("/nonexistent/x.wav"), "{e}");
    }

    #[test]
    fn writes_and_reads_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("out.wav");
        let samples: Vec<i16> = (0..1000).map(|i| ((i * 37) % 2000 - 1000) as i16).collect();
        write(&p, &samples).expect("write");
        assert_eq!(read(&p).expect("read back"), samples);
        // A float file is refused too.
        let fp = dir.path().join("float.wav");
        let mut w = hound::WavWriter::create(
            &fp,
            hound::WavSpec {
                sample_format: hound::SampleFormat::Float,
                bits_per_sample: 32,
                ..spec()
            },
        )
        .expect("create");
        w.write_sample(0.5f32).expect("sample");
        w.finalize().expect("finalize");
        let msg = read(&fp).expect_err("float").to_string();
        assert!(msg.contains("8000 Hz, 1 channel, 32-bit float;"), "{msg}");
    }
}
