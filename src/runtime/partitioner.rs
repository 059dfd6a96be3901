//! How record keys map to partitions, as the input producers map them: librdkafka's
//! `consistent_random` (CRC32; librdkafka, PHP and Python clients) by default, or
//! `murmur2_random` (the Java client's). The same functions librdkafka uses are called.

/// How keys map to partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Partitioner {
    /// CRC32 of the key (librdkafka's default, `consistent_random`).
    ConsistentRandom,
    /// murmur2 of the key (the Java client's default, `murmur2_random`).
    Murmur2Random,
}

impl Partitioner {
    /// The librdkafka `partitioner` setting.
    pub fn setting(self) -> &'static str {
        match self {
            Self::ConsistentRandom => "consistent_random",
            Self::Murmur2Random => "murmur2_random",
        }
    }

    /// The partition of a non-empty key among `partitions`.
    pub fn partition(self, key: &[u8], partitions: i32) -> i32 {
        if partitions <= 0 {
            return 0;
        }
        let f = match self {
            Self::ConsistentRandom => rdkafka::bindings::rd_kafka_msg_partitioner_consistent,
            Self::Murmur2Random => rdkafka::bindings::rd_kafka_msg_partitioner_murmur2,
        };
        // SAFETY: both functions only hash `key[..len]` and take it modulo `partitions` (see
        // rdkafka_msg.c); the topic and opaque pointers are never read.
        unsafe {
            f(
                std::ptr::null(),
                key.as_ptr().cast(),
                key.len(),
                partitions,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_match_the_known_values_of_both_hashes() {
        // Kafka's own test vectors for Utils.murmur2, made positive and taken modulo n as the
        // Java partitioner does.
        for (key, hash) in [
            ("21", -973_932_308i32),
            ("foobar", -790_332_482),
            ("abc", 479_470_107),
        ] {
            assert_eq!(
                Partitioner::Murmur2Random.partition(key.as_bytes(), 6),
                (hash & 0x7fff_ffff) % 6,
                "{key}"
            );
        }
        // CRC32 (IEEE) of "abc" = 0x352441c2 = 891568578.
        assert_eq!(
            Partitioner::ConsistentRandom.partition(b"abc", 7),
            (891_568_578u32 % 7) as i32
        );
        assert_eq!(Partitioner::ConsistentRandom.partition(b"abc", 0), 0);
    }
}
