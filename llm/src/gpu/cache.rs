//! A small bounded least-recently-used map: the uniform and bind group caches of [`GpuOps`](super::GpuOps).
//!
//! Evicting an entry is always safe: wgpu keeps a buffer or bind group alive while a recorded command buffer
//! refers to it, so an evicted uniform only stops being reused.

use std::collections::HashMap;
use std::hash::Hash;

/// At most `cap` entries; inserting into a full map evicts the least recently used one.
#[derive(Debug)]
pub(crate) struct Lru<K, V> {
    map: HashMap<K, (V, u64)>,
    tick: u64,
    cap: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> Lru<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        Lru { map: HashMap::new(), tick: 0, cap: cap.max(1) }
    }

    pub(crate) fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(k).map(|(v, t)| {
            *t = tick;
            v.clone()
        })
    }

    pub(crate) fn insert(&mut self, k: K, v: V) {
        if self.map.len() >= self.cap && !self.map.contains_key(&k) {
            if let Some(old) = self.map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| k.clone()) {
                self.map.remove(&old);
            }
        }
        self.tick += 1;
        self.map.insert(k, (v, self.tick));
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn evicts_least_recently_used() {
        let mut l = Lru::new(2);
        l.insert(1, 'a');
        l.insert(2, 'b');
        assert_eq!(l.get(&1), Some('a')); // 2 is now the oldest
        l.insert(3, 'c');
        assert_eq!((l.get(&1), l.get(&2), l.get(&3)), (Some('a'), None, Some('c')));
        l.insert(3, 'd'); // replacing does not evict
        assert_eq!((l.len(), l.get(&1), l.get(&3)), (2, Some('a'), Some('d')));
    }
}
