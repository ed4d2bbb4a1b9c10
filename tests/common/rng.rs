//! The tests' PRNG (xorshift64): reproducible from a printed seed, shared by the black-box
//! tests (`tests/common`) and the fault harness (`tests/faults`).

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Seeded from the clock; the seed is printed so that a failure can be replayed.
    pub fn from_time() -> Rng {
        let seed = clock_seed();
        eprintln!("rng seed: {seed}");
        Rng::new(seed)
    }

    #[allow(clippy::should_implement_trait)] // a PRNG, not an iterator
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A seed from the clock (nanoseconds since the epoch).
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}
