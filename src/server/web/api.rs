//! The admin REST API: `/api/v1/subscribers` and `/api/v1/routes` (list, add, delete), JSON,
//! `Authorization: Bearer <token>`; the same validation and error texts as `voxgate user …`
//! and `voxgate route …`. Documented in `docs/openapi.yaml`.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{
    MIN_PASSWORD_CHARS, VerifierJson, WebState, field_error, json, parse_body, store_error,
    with_store,
};
use crate::directory::Verifier;
use crate::store::{Route, Subscriber};

fn unauthorized() -> Response {
    let mut r = field_error(
        StatusCode::UNAUTHORIZED,
        None,
        "missing or wrong bearer token",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"voxgate\""),
    );
    r
}

macro_rules! authorize {
    ($state:expr, $headers:expr) => {
        if !$state.authorized(&$headers) {
            return unauthorized();
        }
    };
}

fn done<T>(r: Result<T, Response>, f: impl FnOnce(T) -> Response) -> Response {
    match r {
        Ok(v) => f(v),
        Err(r) => r,
    }
}

pub async fn list_subscribers(State(state): State<WebState>, headers: HeaderMap) -> Response {
    authorize!(state, headers);
    let web_db = state.web_db.clone();
    let r = with_store(&state, move |st| {
        let users = st.list_users().map_err(|e| store_error(&e))?;
        let db = super::db::WebDb::open(&web_db).ok();
        Ok(users
            .into_iter()
            .map(|s| {
                let p = db
                    .as_ref()
                    .and_then(|d| d.profile(&s.user).ok().flatten())
                    .unwrap_or_default();
                serde_json::json!({
                    "user": s.user,
                    "number": s.number,
                    "iterations": s.verifier.iterations,
                    "allow_prefixes": s.allow_prefixes,
                    "display_name": p.display_name,
                    "email": p.email,
                })
            })
            .collect::<Vec<_>>())
    })
    .await;
    done(r, |v| json(StatusCode::OK, &serde_json::Value::Array(v)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSubscriber {
    user: String,
    number: String,
    /// Either a verifier (preferred: the password never travels) ...
    #[serde(default)]
    verifier: Option<VerifierJson>,
    /// ... or the password, turned into a verifier here as `voxgate user add` does.
    #[serde(default)]
    password: Option<String>,
    /// Class of service: the prefixes the user may dial on telephone routes (absent: any).
    #[serde(default)]
    allow_prefixes: Option<Vec<String>>,
}

pub async fn add_subscriber(
    State(state): State<WebState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    authorize!(state, headers);
    let req: NewSubscriber = match parse_body(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    // The CLI's order: user name, number, then the password.
    if let Err(e) = crate::store::validate_user(&req.user) {
        return store_error(&e);
    }
    if let Err(e) = crate::store::validate_number(&req.number) {
        return store_error(&e);
    }
    if let Err(e) = crate::store::validate_allow_prefixes(req.allow_prefixes.as_deref()) {
        return field_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("allow_prefixes"),
            &e.to_string(),
        );
    }
    let verifier = match (&req.verifier, &req.password) {
        (Some(v), None) => match v.decode(state.iterations) {
            Ok(v) => v,
            Err(r) => return r,
        },
        (None, Some(pw)) => {
            if pw.chars().count() < MIN_PASSWORD_CHARS {
                return field_error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Some("password"),
                    "the password must have at least 8 characters",
                );
            }
            let (pw, it) = (pw.clone(), state.iterations);
            match tokio::task::spawn_blocking(move || Verifier::new(&pw, it, &mut rand::rng()))
                .await
            {
                Ok(v) => v,
                Err(e) => {
                    return field_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        None,
                        &format!("internal error: {e}"),
                    );
                }
            }
        }
        _ => {
            return field_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("password"),
                "give exactly one of verifier and password",
            );
        }
    };
    let (user, number) = (req.user.clone(), req.number.clone());
    let r = with_store(&state, move |st| {
        st.add_user(&Subscriber {
            user: req.user,
            number: req.number,
            verifier,
            allow_prefixes: req.allow_prefixes,
        })
        .map_err(|e| store_error(&e))
    })
    .await;
    done(r, |()| {
        tracing::info!(%user, %number, "subscriber added through the admin API");
        json(
            StatusCode::CREATED,
            &serde_json::json!({ "user": user, "number": number }),
        )
    })
}

pub async fn del_subscriber(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Response {
    authorize!(state, headers);
    let web_db = state.web_db.clone();
    let u = user.clone();
    let r = with_store(&state, move |st| {
        crate::store::validate_user(&u).map_err(|e| store_error(&e))?;
        let gone = st.del_user(&u).map_err(|e| store_error(&e))?;
        if gone && let Ok(db) = super::db::WebDb::open(&web_db) {
            let _ = db.del_profile(&u);
        }
        Ok(gone)
    })
    .await;
    done(r, |gone| {
        if gone {
            StatusCode::NO_CONTENT.into_response()
        } else {
            field_error(
                StatusCode::NOT_FOUND,
                Some("user"),
                &format!("no user {user:?}"),
            )
        }
    })
}

pub async fn list_routes(State(state): State<WebState>, headers: HeaderMap) -> Response {
    authorize!(state, headers);
    let r = with_store(&state, |st| st.list_routes().map_err(|e| store_error(&e))).await;
    done(r, |routes| {
        json(
            StatusCode::OK,
            &serde_json::Value::Array(
                routes
                    .into_iter()
                    .map(|r| {
                        serde_json::json!({
                            "prefix": r.prefix,
                            "media_addr": r.media_addr.to_string(),
                            "description": r.description,
                            "ports": r.ports,
                        })
                    })
                    .collect(),
            ),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewRoute {
    prefix: String,
    media_addr: String,
    #[serde(default)]
    description: String,
    /// Calls the route carries at once, each on its own port from `media_addr`'s (default 1).
    #[serde(default = "one")]
    ports: u16,
}

fn one() -> u16 {
    1
}

pub async fn add_route(State(state): State<WebState>, headers: HeaderMap, body: Bytes) -> Response {
    authorize!(state, headers);
    let req: NewRoute = match parse_body(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Ok(media_addr) = req.media_addr.parse::<SocketAddr>() else {
        return field_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("media_addr"),
            &format!(
                "invalid media address {:?}: expected IP:PORT",
                req.media_addr
            ),
        );
    };
    let route = Route {
        prefix: req.prefix,
        media_addr,
        description: req.description,
        ports: req.ports,
    };
    let prefix = route.prefix.clone();
    let r = with_store(&state, move |st| {
        st.add_route(&route).map_err(|e| store_error(&e))
    })
    .await;
    done(r, |()| {
        json(
            StatusCode::CREATED,
            &serde_json::json!({ "prefix": prefix, "media_addr": media_addr.to_string() }),
        )
    })
}

pub async fn del_route(
    State(state): State<WebState>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
) -> Response {
    authorize!(state, headers);
    let p = prefix.clone();
    let r = with_store(&state, move |st| {
        crate::store::validate_prefix(&p).map_err(|e| store_error(&e))?;
        st.del_route(&p).map_err(|e| store_error(&e))
    })
    .await;
    done(r, |gone| {
        if gone {
            StatusCode::NO_CONTENT.into_response()
        } else {
            field_error(
                StatusCode::NOT_FOUND,
                Some("prefix"),
                &format!("no route for prefix {prefix:?}"),
            )
        }
    })
}
