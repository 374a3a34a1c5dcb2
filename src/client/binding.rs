//! The client's half of a media binding: the STUN Binding request that proves a leg key to the
//! gateway (USERNAME = leg id, MESSAGE-INTEGRITY keyed by the leg key, FINGERPRINT), and the
//! check of the gateway's answer, which must carry MESSAGE-INTEGRITY with the same key: only
//! the real gateway knows it, so a spoofed "gateway" cannot answer (the seed's warning about
//! a faked gateway address). Sans-IO: the caller sends and receives the bytes, over UDP or as
//! the first RFC 4571 frame on a TCP media connection.

use std::net::SocketAddr;

use crate::wire::stun;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BindingError {
    #[error("binding request does not fit in {0} bytes")]
    BufferTooSmall(usize),
    #[error("the answer is not a STUN message: {0}")]
    Malformed(stun::StunError),
    #[error("the answer belongs to another transaction")]
    WrongTransaction,
    #[error("the gateway refused the binding (error response)")]
    Refused,
    #[error("the answer is not a Binding success response")]
    Unexpected,
    #[error("the answer's MESSAGE-INTEGRITY does not match the leg key: not our gateway")]
    Integrity,
    #[error("the answer has no XOR-MAPPED-ADDRESS")]
    NoMappedAddress,
}

/// Writes a Binding request for `leg` into `buf`; returns its length.
pub fn request(
    buf: &mut [u8],
    leg: &str,
    key: &[u8],
    txid: &[u8; 12],
) -> Result<usize, BindingError> {
    let cap = buf.len();
    let mut w = stun::Writer::new(buf, stun::Class::Request, stun::BINDING, txid)
        .map_err(|_| BindingError::BufferTooSmall(cap))?;
    w.attr(stun::attr::USERNAME, leg.as_bytes())
        .map_err(|_| BindingError::BufferTooSmall(cap))?;
    w.message_integrity(key)
        .map_err(|_| BindingError::BufferTooSmall(cap))?;
    w.fingerprint()
        .map_err(|_| BindingError::BufferTooSmall(cap))?;
    Ok(w.finish())
}

/// Checks the gateway's answer to the request with `txid`; returns the mapped (server-
/// reflexive) address the gateway saw.
pub fn check_response(msg: &[u8], key: &[u8], txid: &[u8; 12]) -> Result<SocketAddr, BindingError> {
    let m = stun::Message::parse(msg).map_err(BindingError::Malformed)?;
    if m.transaction_id() != txid {
        return Err(BindingError::WrongTransaction);
    }
    if m.method() != stun::BINDING {
        return Err(BindingError::Unexpected);
    }
    match m.class() {
        stun::Class::Success => {}
        stun::Class::Error => return Err(BindingError::Refused),
        _ => return Err(BindingError::Unexpected),
    }
    m.check_integrity(key)
        .map_err(|_| BindingError::Integrity)?;
    m.check_fingerprint().map_err(|_| BindingError::Integrity)?;
    m.xor_address(stun::attr::XOR_MAPPED_ADDRESS)
        .map_err(BindingError::Malformed)?
        .ok_or(BindingError::NoMappedAddress)
}

/// A fresh random transaction id.
pub fn new_txid() -> [u8; 12] {
    rand::random()
}
