//! Directory look-ups off the control thread.
//!
//! The control core asks the directory through `Action::Lookup`; this module answers on a few
//! worker threads, each with its own store connection (SQLite in WAL mode lets readers run side
//! by side, and each connection keeps its prepared statements cached), and hands every answer
//! back to the control loop as `Input::LookupDone`. A busy or slow store (a writer holding the
//! lock for `busy_timeout`, a remote database) delays only the look-ups queued behind it; the
//! control thread never waits for it, so heart-beats and calls in progress keep their timing.
//!
//! Bounded: at most [`QUEUE`] questions wait for a worker; beyond, the question is answered at
//! once with an error ("the directory is overloaded"). Every question gets exactly one answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, TrySendError};

use crate::directory::{Answer, LookupError, Query};
use crate::store::{Store, StoreError};

/// Opens one store connection per worker.
pub type StoreFactory = Arc<dyn Fn() -> Result<Box<dyn Store>, StoreError> + Send + Sync>;

/// Questions waiting for a worker, at most.
pub const QUEUE: usize = 4096;

/// Worker threads (store connections).
pub const WORKERS: usize = 2;

/// The look-up workers. Dropping it stops them: questions still queued are not answered (the
/// control loop is gone), and a worker inside a slow query exits when it returns.
pub struct Directory {
    tx: Option<Sender<(u64, Query)>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Directory {
    /// Opens `workers` store connections (the first error is returned, nothing keeps running)
    /// and starts a thread for each; `answer(id, result)` is called on the worker's thread.
    pub fn spawn<F>(factory: &StoreFactory, workers: usize, answer: F) -> Result<Self, StoreError>
    where
        F: Fn(u64, Result<Answer, LookupError>) + Send + Clone + 'static,
    {
        let (tx, rx) = crossbeam_channel::bounded::<(u64, Query)>(QUEUE);
        let mut stores = Vec::new();
        for _ in 0..workers.max(1) {
            stores.push(factory()?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, store) in stores.into_iter().enumerate() {
            let rx = rx.clone();
            let answer = answer.clone();
            let stop = stop.clone();
            let t = std::thread::Builder::new()
                .name(format!("voxgate-dir-{i}"))
                .spawn(move || {
                    for (id, query) in rx {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let result = crate::store::answer(&*store, &query)
                            .map_err(|e| LookupError(e.to_string()));
                        answer(id, result);
                    }
                })
                .map_err(|e| StoreError::Corrupt {
                    what: format!("cannot start a directory thread: {e}"),
                })?;
            threads.push(t);
        }
        Ok(Directory {
            tx: Some(tx),
            stop,
            threads,
        })
    }

    /// Queues a question; when the queue is full (or the workers are gone) the error is the
    /// answer to give at once.
    pub fn ask(&self, id: u64, query: Query) -> Result<(), LookupError> {
        let Some(tx) = &self.tx else {
            return Err(LookupError("the directory is stopped".into()));
        };
        match tx.try_send((id, query)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(LookupError(format!(
                "the directory is overloaded ({QUEUE} look-ups queued)"
            ))),
            Err(TrySendError::Disconnected(_)) => {
                Err(LookupError("the directory workers stopped".into()))
            }
        }
    }
}

impl Drop for Directory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        // Not joined: a worker may be inside a slow query; it exits when that returns.
        self.threads.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::{Destination, Subscriber, Verifier};
    use crate::store::SqliteStore;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn file_factory(dir: &std::path::Path) -> StoreFactory {
        let path = dir.join("voxgate.db");
        let mut s = SqliteStore::open(&path).unwrap();
        s.add_user(&Subscriber {
            user: "alice".into(),
            number: "+15550001".into(),
            verifier: Verifier::with_salt("pw", b"0123456789abcdef", 7),
            allow_prefixes: None,
        })
        .unwrap();
        Arc::new(move || Ok(Box::new(SqliteStore::open(&path)?) as Box<dyn Store>))
    }

    #[test]
    fn answers_every_question_once_off_the_callers_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel();
        let d = Directory::spawn(&file_factory(dir.path()), 2, move |id, r| {
            let _ = tx.send((id, r, std::thread::current().name().map(str::to_owned)));
        })
        .unwrap();
        for id in 0..100u64 {
            let q = if id % 2 == 0 {
                Query::Login {
                    user: "alice".into(),
                }
            } else {
                Query::Dial {
                    number: "+15550001".into(),
                }
            };
            d.ask(id, q).unwrap();
        }
        d.ask(100, Query::TypicalIterations).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..101 {
            let (id, r, thread) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert!(seen.insert(id), "answered twice: {id}");
            assert!(thread.unwrap().starts_with("voxgate-dir-"));
            match (id, r.unwrap()) {
                (100, Answer::TypicalIterations(n)) => assert_eq!(n, Some(7)),
                (id, Answer::Login(Some(s))) if id % 2 == 0 => assert_eq!(s.number, "+15550001"),
                (id, Answer::Dial(Some(Destination::User { user, .. }))) if id % 2 == 1 => {
                    assert_eq!(user, "alice")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(d);
    }

    /// A store that takes `delay` for every look-up.
    struct Slow(SqliteStore, Duration);

    impl Store for Slow {
        fn add_user(&mut self, s: &Subscriber) -> Result<(), StoreError> {
            self.0.add_user(s)
        }
        fn del_user(&mut self, u: &str) -> Result<bool, StoreError> {
            self.0.del_user(u)
        }
        fn set_verifier(&mut self, u: &str, v: &Verifier) -> Result<bool, StoreError> {
            self.0.set_verifier(u, v)
        }
        fn user(&self, u: &str) -> Result<Option<Subscriber>, StoreError> {
            std::thread::sleep(self.1);
            self.0.user(u)
        }
        fn user_by_number(&self, n: &str) -> Result<Option<Subscriber>, StoreError> {
            std::thread::sleep(self.1);
            self.0.user_by_number(n)
        }
        fn list_users(&self) -> Result<Vec<Subscriber>, StoreError> {
            self.0.list_users()
        }
        fn add_route(&mut self, r: &crate::store::Route) -> Result<(), StoreError> {
            self.0.add_route(r)
        }
        fn del_route(&mut self, p: &str) -> Result<bool, StoreError> {
            self.0.del_route(p)
        }
        fn list_routes(&self) -> Result<Vec<crate::store::Route>, StoreError> {
            self.0.list_routes()
        }
        fn route_for(&self, n: &str) -> Result<Option<crate::store::Route>, StoreError> {
            self.0.route_for(n)
        }
    }

    #[test]
    fn a_slow_store_never_blocks_the_asker_and_an_overfull_queue_answers_at_once() {
        let factory: StoreFactory = Arc::new(|| {
            Ok(Box::new(Slow(
                SqliteStore::open_in_memory()?,
                Duration::from_millis(200),
            )) as Box<dyn Store>)
        });
        let (tx, rx) = mpsc::channel();
        let d = Directory::spawn(&factory, 1, move |id, r| {
            let _ = tx.send((id, r));
        })
        .unwrap();
        let t0 = Instant::now();
        let mut refused = 0;
        for id in 0..(QUEUE as u64 + 100) {
            let q = Query::Login {
                user: format!("u{id}"),
            };
            if let Err(e) = d.ask(id, q) {
                assert!(e.0.contains("overloaded"), "{e}");
                refused += 1;
            }
        }
        // Asking never waited for the store.
        assert!(
            t0.elapsed() < Duration::from_millis(150),
            "{:?}",
            t0.elapsed()
        );
        assert!(refused >= 99, "the queue is bounded: {refused} refused");
        let (_, first) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first.unwrap(), Answer::Login(None));
    }
}
