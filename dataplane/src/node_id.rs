//! Node IDs as stored in every value: interned, so a million cached
//! presences written by three nodes share three strings instead of holding
//! a million copies. A [`NodeId`] is one thin pointer (8 bytes, not an
//! `Arc<str>`'s 16), as every cached manual status holds one.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

/// How many distinct node IDs are shared; past this (values written by
/// something other than a handful of nodes), each value keeps its own
/// copy, so no writer can grow the table without bound.
const MAX_INTERNED: usize = 4096;

/// The shared copy of each interned ID, by its text.
static INTERNED: LazyLock<Mutex<HashMap<Box<str>, Shared>>> = LazyLock::new(Mutex::default);

/// The text of a node ID behind one thin pointer.
type Shared = Arc<Box<str>>;

thread_local! {
    /// The ID this thread interned last (one string per thread at most).
    static LAST: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

/// The node that accepted a write (its `NODE_ID`).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(Shared);

impl NodeId {
    /// The shared copy of `id`. The ID a thread looked up last is answered
    /// without the table's lock: a replay of the bucket reads long runs of
    /// values written by the same node.
    pub fn new(id: &str) -> Self {
        let last =
            LAST.with_borrow(|last| last.as_ref().filter(|s| s.as_ref().as_ref() == id).cloned());
        if let Some(shared) = last {
            return NodeId(shared);
        }
        let shared = Self::intern(id);
        LAST.set(Some(shared.clone()));
        NodeId(shared)
    }

    fn intern(id: &str) -> Shared {
        let mut interned = INTERNED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = interned.get(id) {
            return shared.clone();
        }
        let owned: Shared = Arc::new(id.into());
        if interned.len() < MAX_INTERNED {
            interned.insert(id.into(), owned.clone());
        }
        owned
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for NodeId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        NodeId::new(id)
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        NodeId::new(&id)
    }
}

impl PartialEq<str> for NodeId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for NodeId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = NodeId;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a node ID")
            }

            fn visit_str<E: serde::de::Error>(self, id: &str) -> Result<NodeId, E> {
                Ok(NodeId::new(id))
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_ids_share_one_string() {
        let a: NodeId = serde_json::from_str("\"center-1\"").unwrap();
        let b = NodeId::new("center-1");
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"center-1\"");
        assert_eq!(a, "center-1");
        let escaped: NodeId = serde_json::from_str("\"eu\\u002d1\"").unwrap();
        assert_eq!(escaped.as_str(), "eu-1");
        assert_eq!(std::mem::size_of::<NodeId>(), 8);
        assert_eq!(NodeId::default(), "");
    }

    #[test]
    fn a_threads_last_id_is_the_shared_copy() {
        let a = NodeId::new("alt-a");
        let b = NodeId::new("alt-b");
        let again = NodeId::new("alt-a");
        let once_more = NodeId::new("alt-a");
        assert!(Arc::ptr_eq(&a.0, &again.0));
        assert!(Arc::ptr_eq(&again.0, &once_more.0));
        assert_eq!(b, "alt-b");
        let elsewhere = std::thread::spawn(|| NodeId::new("alt-a"))
            .join()
            .expect("the thread ends");
        assert!(Arc::ptr_eq(&a.0, &elsewhere.0));
    }
}
