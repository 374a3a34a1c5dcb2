//! Kernel TLS (kTLS) on a TCP media connection: after rustls finished the TLS 1.3 handshake
//! (and read nothing past the client's Finished), its traffic secrets and record sequence
//! numbers go into the socket (`setsockopt(SOL_TCP, TCP_ULP, "tls")`, then `SOL_TLS`
//! `TLS_TX` and `TLS_RX`), and from then on the kernel encrypts what the shard sends and
//! decrypts what it receives: the shard's io_uring loop keeps reading and writing plain
//! RFC 4571 bytes from its buffers, no copy in user space.
//!
//! Limits of the kernel side: a TLS record other than application data (a KeyUpdate, an alert)
//! arriving on a kTLS socket makes the read fail (`EIO`), and the shard closes the connection;
//! the gateway never sends one (no session tickets, no key updates: a voice call stays far
//! below AES-GCM's record limits).

use std::io;
use std::os::fd::RawFd;

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// `TCP_ULP` (linux/tcp.h).
const TCP_ULP: libc::c_int = 31;
/// `TLS_TX`, `TLS_RX` (linux/tls.h).
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// `struct tls12_crypto_info_aes_gcm_128` (used for TLS 1.3 too).
#[repr(C)]
struct AesGcm128 {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; 16],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_aes_gcm_256`.
#[repr(C)]
struct AesGcm256 {
    version: u16,
    cipher_type: u16,
    iv: [u8; 8],
    key: [u8; 32],
    salt: [u8; 4],
    rec_seq: [u8; 8],
}

/// `struct tls12_crypto_info_chacha20_poly1305` (no salt: the whole 12-byte IV is `iv`).
#[repr(C)]
struct Chacha20Poly1305 {
    version: u16,
    cipher_type: u16,
    iv: [u8; 12],
    key: [u8; 32],
    rec_seq: [u8; 8],
}

/// Why kernel TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error(
        "kernel TLS is not available: the kernel has no \"tls\" upper layer protocol \
         (load it with `modprobe tls`; or set single_port.tls_engine = \"userspace\", or \"shard\"): {0}"
    )]
    Unavailable(io::Error),
    #[error("kernel TLS: {what}: {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
    #[error("kernel TLS: the connection's cipher suite is not one the kernel takes")]
    Cipher,
}

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &[u8]) -> io::Result<()> {
    // SAFETY: `val` is a valid buffer of the length passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether this kernel takes TLS sockets: tries it on a loopback TCP connection of its own.
pub fn available() -> Result<(), KtlsError> {
    use std::os::fd::AsRawFd;
    let setup = |what, source| KtlsError::Setup { what, source };
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| setup("probe listener", e))?;
    let c = std::net::TcpStream::connect(l.local_addr().map_err(|e| setup("probe", e))?)
        .map_err(|e| setup("probe connect", e))?;
    let _accepted = l.accept().map_err(|e| setup("probe accept", e))?;
    setsockopt(c.as_raw_fd(), libc::SOL_TCP, TCP_ULP, b"tls").map_err(KtlsError::Unavailable)
}

/// The bytes of one direction's crypto info, from rustls's secrets and sequence number.
fn crypto_info(seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<Vec<u8>, KtlsError> {
    fn bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: T is one of the repr(C) structs above, all plain bytes with no padding
        // (two u16 then byte arrays).
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }
    let rec_seq = seq.to_be_bytes();
    Ok(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(4);
            bytes(&AesGcm128 {
                version: TLS_1_3_VERSION,
                cipher_type: TLS_CIPHER_AES_GCM_128,
                iv: iv.try_into().map_err(|_| KtlsError::Cipher)?,
                key: key.as_ref().try_into().map_err(|_| KtlsError::Cipher)?,
                salt: salt.try_into().map_err(|_| KtlsError::Cipher)?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let (salt, iv) = iv.as_ref().split_at(4);
            bytes(&AesGcm256 {
                version: TLS_1_3_VERSION,
                cipher_type: TLS_CIPHER_AES_GCM_256,
                iv: iv.try_into().map_err(|_| KtlsError::Cipher)?,
                key: key.as_ref().try_into().map_err(|_| KtlsError::Cipher)?,
                salt: salt.try_into().map_err(|_| KtlsError::Cipher)?,
                rec_seq,
            })
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => bytes(&Chacha20Poly1305 {
            version: TLS_1_3_VERSION,
            cipher_type: TLS_CIPHER_CHACHA20_POLY1305,
            iv: iv.as_ref().try_into().map_err(|_| KtlsError::Cipher)?,
            key: key.as_ref().try_into().map_err(|_| KtlsError::Cipher)?,
            rec_seq,
        }),
        _ => return Err(KtlsError::Cipher),
    })
}

/// Turns kernel TLS on for `fd` with the secrets of its finished handshake. On error the
/// socket is unusable for TLS and must be closed.
pub fn enable(fd: RawFd, secrets: ExtractedSecrets) -> Result<(), KtlsError> {
    let mut tx = crypto_info(secrets.tx.0, &secrets.tx.1)?;
    let mut rx = crypto_info(secrets.rx.0, &secrets.rx.1)?;
    let r = setsockopt(fd, libc::SOL_TCP, TCP_ULP, b"tls")
        .map_err(KtlsError::Unavailable)
        .and_then(|()| {
            setsockopt(fd, libc::SOL_TLS, TLS_TX, &tx).map_err(|source| KtlsError::Setup {
                what: "TLS_TX",
                source,
            })
        })
        .and_then(|()| {
            setsockopt(fd, libc::SOL_TLS, TLS_RX, &rx).map_err(|source| KtlsError::Setup {
                what: "TLS_RX",
                source,
            })
        });
    // The keys do not outlive their use.
    for b in tx.iter_mut().chain(rx.iter_mut()) {
        // SAFETY: a valid &mut u8; volatile so that the wipe is not optimised away.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_info_layout_matches_the_kernel_structs() {
        // linux/tls.h: 4 + 8 + 16 + 4 + 8 = 40; 4 + 8 + 32 + 4 + 8 = 56; 4 + 12 + 32 + 8 = 56.
        assert_eq!(size_of::<AesGcm128>(), 40);
        assert_eq!(size_of::<AesGcm256>(), 56);
        assert_eq!(size_of::<Chacha20Poly1305>(), 56);
        let iv: [u8; 12] = core::array::from_fn(|i| i as u8);
        let s = ConnectionTrafficSecrets::Aes128Gcm {
            key: rustls::crypto::cipher::AeadKey::from([0xaa; 32]),
            iv: rustls::crypto::cipher::Iv::new(iv),
        };
        // An AeadKey is 32 bytes long here, not 16: refused, not truncated.
        assert!(matches!(crypto_info(1, &s), Err(KtlsError::Cipher)));
        let s = ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from([0xaa; 32]),
            iv: rustls::crypto::cipher::Iv::new(iv),
        };
        let b = crypto_info(0x0102, &s).unwrap();
        assert_eq!(
            &b[..4],
            &[0x04, 0x03, 52, 0],
            "version 0x0304, cipher 52 (LE)"
        );
        assert_eq!(&b[4..12], &iv[4..], "iv: the last 8 bytes of rustls's IV");
        assert_eq!(&b[12..44], &[0xaa; 32]);
        assert_eq!(&b[44..48], &iv[..4], "salt: its first 4");
        assert_eq!(
            &b[48..],
            &[0, 0, 0, 0, 0, 0, 1, 2],
            "record sequence, big-endian"
        );
    }
}
