//! A stable 64-bit hash (FNV-1a) for seeds and splits: unlike `DefaultHasher`, its values
//! never change across runs, platforms or Rust versions, so outputs stay reproducible.

pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_value_and_part_boundaries_matter() {
        assert_eq!(super::fnv1a(&[]), 0xcbf29ce484222325);
        assert_ne!(super::fnv1a(&[b"ab", b"c"]), super::fnv1a(&[b"a", b"bc"]));
    }
}
