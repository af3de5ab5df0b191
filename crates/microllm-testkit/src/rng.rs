//! A tiny deterministic PRNG (SplitMix64) and bit-reproducible "normal" samples.

/// SplitMix64: 64-bit state, passes BigCrush, and is trivially reproducible everywhere.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator for the stream named `name` under `seed`: each tensor gets its own stream,
    /// so adding a layer does not change the weights of the others.
    pub fn for_stream(seed: u64, name: &str) -> Self {
        // FNV-1a over the name, then mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut g = SplitMix64(seed ^ h);
        g.next_u64();
        g
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), with 24 bits of precision (exact in f32).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [lo, hi).
    pub fn uniform_in(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Approximately standard normal: Irwin-Hall sum of four uniforms, centred and scaled to
    /// unit variance. Uses only + and *, so the values are bit-identical on every platform
    /// (no libm `ln`/`cos` whose last bit may differ).
    pub fn normal(&mut self) -> f32 {
        let s = self.uniform() + self.uniform() + self.uniform() + self.uniform();
        (s - 2.0) * 1.732_050_8 // sqrt(3): the sum has variance 4/12
    }
}
