//! Who gets what from a server: each client's token selects a *grant*, the
//! root its sessions are confined to and which way files may move there.
//!
//! A [`Policy`] is either one grant for anyone who connects (`--no-auth`)
//! or a list of tokens, each with its grant. The server proves nothing
//! about which token a client holds beyond the challenge: the client
//! answers `HMAC(token, nonce ‖ binding)` as always, and the server tries
//! every configured token's MAC, each in constant time, all of them
//! whatever matched, so the wire is the same for one token or many.
//!
//! A [`LivePolicy`] is what the server consults when a session starts. It
//! can be replaced while the server runs (the binary does on SIGHUP): a
//! session keeps the grant it authenticated with, with its root's handle,
//! until it ends; sessions that start later get the new policy.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::auth::Token;
use crate::error::PolicyError;

/// Which way files may move through a grant.
///
/// A new mode (append-only: uploads that may add files but never replace
/// or change one) is a new variant here, a refusal in the server's
/// `check_access`, and the receiver's rule that enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Uploads and downloads.
    #[default]
    ReadWrite,
    /// Downloads only: nothing below the root is ever created or changed.
    ReadOnly,
    /// Uploads only: nothing below the root is ever sent out.
    WriteOnly,
    /// Uploads and downloads, but nothing that exists is ever overwritten,
    /// truncated or deleted: new files and directories only (a backup
    /// target a compromised client cannot destroy).
    AppendOnly,
}

impl Access {
    /// As the configuration file and the log spell it.
    pub fn name(self) -> &'static str {
        match self {
            Access::ReadWrite => "read-write",
            Access::ReadOnly => "read-only",
            Access::WriteOnly => "write-only",
            Access::AppendOnly => "append-only",
        }
    }
}

/// A grant as configured: what [`Policy`] opens.
#[derive(Debug, Clone)]
pub struct GrantSpec {
    /// The grant's (and its token's) name, for the log.
    pub name: String,
    /// The root's name, for the log and errors.
    pub root_name: String,
    /// The directory its sessions are confined to.
    pub root: PathBuf,
    pub access: Access,
}

/// What one authenticated client may do: a root, held open, and its access.
#[derive(Debug)]
pub struct Grant {
    name: String,
    root_name: String,
    root_path: PathBuf,
    /// Every path of a session is resolved beneath this handle, not by name.
    pub(crate) root: Arc<OwnedFd>,
    pub(crate) access: Access,
}

impl Grant {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn access(&self) -> Access {
        self.access
    }

    /// The root's name and the path it was opened by.
    pub fn root(&self) -> (&str, &Path) {
        (&self.root_name, &self.root_path)
    }
}

/// Who gets which grant.
#[derive(Debug)]
pub struct Policy {
    who: Who,
}

#[derive(Debug)]
enum Who {
    /// Every client, unauthenticated.
    Anyone(Arc<Grant>),
    /// The clients that prove one of these tokens, each its grant.
    Tokens(Vec<(Token, Arc<Grant>)>),
}

impl Policy {
    /// Every client gets `spec`, without a token (`--no-auth`).
    pub fn anyone(spec: GrantSpec) -> Result<Policy, PolicyError> {
        let grant = open_grants(vec![spec])?.remove(0);
        Ok(Policy {
            who: Who::Anyone(grant),
        })
    }

    /// A client that proves one of the tokens gets its grant; others get
    /// nothing. Each root is opened once, however many grants share it.
    /// Two grants may not share a token (the token is what tells them
    /// apart) nor a name (the log tells them apart by it).
    pub fn tokens(grants: Vec<(Token, GrantSpec)>) -> Result<Policy, PolicyError> {
        if grants.is_empty() {
            return Err(PolicyError::NoTokens);
        }
        for (i, (token, spec)) in grants.iter().enumerate() {
            for (other, earlier) in &grants[..i] {
                if earlier.name == spec.name {
                    return Err(PolicyError::SameName(spec.name.clone()));
                }
                if other == token {
                    return Err(PolicyError::SameToken {
                        first: earlier.name.clone(),
                        second: spec.name.clone(),
                    });
                }
            }
        }
        let (tokens, specs): (Vec<Token>, Vec<GrantSpec>) = grants.into_iter().unzip();
        let grants = open_grants(specs)?;
        Ok(Policy {
            who: Who::Tokens(tokens.into_iter().zip(grants).collect()),
        })
    }

    /// The grant of a server that asks for no token.
    pub(crate) fn open_grant(&self) -> Option<Arc<Grant>> {
        match &self.who {
            Who::Anyone(grant) => Some(grant.clone()),
            Who::Tokens(_) => None,
        }
    }

    /// The grant whose token `mac` proves for `nonce` on a connection bound
    /// by `exporter`. Every token's MAC is checked (each in constant time),
    /// also after one matched, so the time taken says nothing about which.
    pub(crate) fn grant_for(&self, nonce: &[u8], exporter: &[u8], mac: &str) -> Option<Arc<Grant>> {
        let Who::Tokens(tokens) = &self.who else {
            return None;
        };
        let mut found = None;
        for (token, grant) in tokens {
            if token.verify(nonce, exporter, mac) && found.is_none() {
                found = Some(grant.clone());
            }
        }
        found
    }

    /// Every grant, in the order configured.
    pub fn grants(&self) -> Vec<Arc<Grant>> {
        match &self.who {
            Who::Anyone(grant) => vec![grant.clone()],
            Who::Tokens(tokens) => tokens.iter().map(|(_, g)| g.clone()).collect(),
        }
    }

    /// Each root once, with the path it was opened by.
    pub(crate) fn roots(&self) -> Vec<(PathBuf, Arc<OwnedFd>)> {
        let mut roots: Vec<(PathBuf, Arc<OwnedFd>)> = Vec::new();
        for grant in self.grants() {
            if !roots.iter().any(|(_, fd)| Arc::ptr_eq(fd, &grant.root)) {
                roots.push((grant.root_path.clone(), grant.root.clone()));
            }
        }
        roots
    }
}

/// Open each spec's root (once per path) and make its grant.
fn open_grants(specs: Vec<GrantSpec>) -> Result<Vec<Arc<Grant>>, PolicyError> {
    let mut opened: HashMap<PathBuf, Arc<OwnedFd>> = HashMap::new();
    let mut grants = Vec::with_capacity(specs.len());
    for spec in specs {
        let root = match opened.get(&spec.root) {
            Some(fd) => fd.clone(),
            None => {
                let fd = Arc::new(open_root(&spec.root).map_err(|error| PolicyError::Root {
                    name: spec.root_name.clone(),
                    path: spec.root.clone(),
                    error,
                })?);
                opened.insert(spec.root.clone(), fd.clone());
                fd
            }
        };
        grants.push(Arc::new(Grant {
            name: spec.name,
            root_name: spec.root_name,
            root_path: spec.root,
            root,
            access: spec.access,
        }));
    }
    Ok(grants)
}

/// A directory a server serves, held open: every path is resolved beneath
/// this handle, not by name.
fn open_root(root: &Path) -> std::io::Result<OwnedFd> {
    rustix::fs::open(
        root,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(std::io::Error::from)
}

/// The policy new sessions get, which may be replaced while the server
/// runs. Clones share it.
#[derive(Debug, Clone)]
pub struct LivePolicy(Arc<RwLock<Arc<Policy>>>);

impl LivePolicy {
    pub fn new(policy: Policy) -> LivePolicy {
        LivePolicy(Arc::new(RwLock::new(Arc::new(policy))))
    }

    /// Sessions that start from now on get `policy`; those running keep
    /// the grant they started with.
    pub fn replace(&self, policy: Policy) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// The policy as it is now.
    pub fn current(&self) -> Arc<Policy> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, root: &Path, access: Access) -> GrantSpec {
        GrantSpec {
            name: name.into(),
            root_name: format!("{name}-root"),
            root: root.to_path_buf(),
            access,
        }
    }

    fn token(text: &str) -> Token {
        Token::new(text).unwrap()
    }

    #[test]
    fn each_token_selects_its_own_grant() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let policy = Policy::tokens(vec![
            (token("alpha"), spec("reader", &a, Access::ReadOnly)),
            (token("beta"), spec("writer", &b, Access::WriteOnly)),
        ])
        .unwrap();
        assert!(policy.open_grant().is_none());
        let (nonce, binding) = (b"nonce", b"binding");
        let reader = policy
            .grant_for(nonce, binding, &token("alpha").mac(nonce, binding))
            .unwrap();
        assert_eq!(
            (reader.name(), reader.access()),
            ("reader", Access::ReadOnly)
        );
        assert_eq!(reader.root(), ("reader-root", a.as_path()));
        let writer = policy
            .grant_for(nonce, binding, &token("beta").mac(nonce, binding))
            .unwrap();
        assert_eq!(
            (writer.name(), writer.access()),
            ("writer", Access::WriteOnly)
        );
        let wrong = token("gamma").mac(nonce, binding);
        assert!(policy.grant_for(nonce, binding, &wrong).is_none());
        // A proof for another nonce or channel proves nothing here.
        let other = token("alpha").mac(b"other", binding);
        assert!(policy.grant_for(nonce, binding, &other).is_none());
    }

    #[test]
    fn a_root_shared_by_grants_is_opened_once() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy::tokens(vec![
            (token("one"), spec("one", dir.path(), Access::ReadOnly)),
            (token("two"), spec("two", dir.path(), Access::ReadWrite)),
        ])
        .unwrap();
        assert_eq!(policy.roots().len(), 1);
        assert_eq!(policy.grants().len(), 2);
    }

    #[test]
    fn ambiguous_or_empty_policies_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let same_token = Policy::tokens(vec![
            (token("t"), spec("one", dir.path(), Access::ReadOnly)),
            (token("t\n"), spec("two", dir.path(), Access::ReadWrite)),
        ]);
        assert!(
            matches!(&same_token, Err(PolicyError::SameToken { first, second })
                if first == "one" && second == "two"),
            "{same_token:?}"
        );
        let same_name = Policy::tokens(vec![
            (token("t1"), spec("one", dir.path(), Access::ReadOnly)),
            (token("t2"), spec("one", dir.path(), Access::ReadWrite)),
        ]);
        assert!(matches!(same_name, Err(PolicyError::SameName(n)) if n == "one"));
        assert!(matches!(
            Policy::tokens(Vec::new()),
            Err(PolicyError::NoTokens)
        ));
    }

    #[test]
    fn a_missing_root_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let e = Policy::anyone(spec("all", &missing, Access::ReadWrite)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("all-root"), "{text}");
        assert!(text.contains(&missing.display().to_string()), "{text}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(Policy::anyone(spec("all", &file, Access::ReadWrite)).is_err());
    }

    #[test]
    fn a_replaced_policy_leaves_what_was_taken_before() {
        let dir = tempfile::tempdir().unwrap();
        let live =
            LivePolicy::new(Policy::anyone(spec("old", dir.path(), Access::ReadOnly)).unwrap());
        let before = live.current().open_grant().unwrap();
        live.replace(Policy::anyone(spec("new", dir.path(), Access::WriteOnly)).unwrap());
        assert_eq!(before.name(), "old");
        assert_eq!(before.access(), Access::ReadOnly);
        let after = live.current().open_grant().unwrap();
        assert_eq!((after.name(), after.access()), ("new", Access::WriteOnly));
    }
}
