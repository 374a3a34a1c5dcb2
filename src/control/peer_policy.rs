//! The peer-address policy the control core checks media destinations against. The type
//! lives in [`crate::net::policy`] (neutral vocabulary): the shards enforce the same policy
//! when a leg latches onto a new UDP source, and they must not import the control core.

pub use crate::net::policy::*;
