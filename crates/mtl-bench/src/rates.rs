//! `mtl-bench rates`: how many multiply-accumulates one core retires per second with each instruction mix an
//! int8 or f32 product kernel can be built from, measured on the CPU at hand. It decides whether int8 products
//! can be faster than f32 ones here: where the CPU has neither VNNI nor AMX-INT8, an int8 kernel multiplies
//! unsigned by signed bytes into 16-bit pair sums (`vpmaddubsw`), widens those to 32 bits (`vpmaddwd` by
//! ones) and adds them (`vpaddd`): three instructions for 32 multiply-accumulates, against one FMA for 8; or
//! it widens both to 16 bits and multiplies pairs into 32-bit sums (`vpmaddwd`, then `vpaddd`): two for 16.
//! Each loop is written in assembly (the instructions are exact: no compiler hoisting or spilling), eight
//! independent accumulators deep, on one thread.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::time::Instant;

use anyhow::Result;

#[cfg(target_arch = "x86_64")]
/// Loop iterations per timing (each iteration retires 8 groups of instructions).
const ITERATIONS: usize = 50_000_000;

#[cfg(target_arch = "x86_64")]
/// Runs `f(ITERATIONS)` five times and returns the best time in seconds.
fn best(f: impl Fn(usize)) -> f64 {
    (0..5)
        .map(|_| {
            let t0 = Instant::now();
            f(ITERATIONS);
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    /// 8 × `vfmadd231ps` (8 f32 multiply-accumulates each) per iteration.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_f32(iterations: usize) {
        asm!(
            "vxorps ymm0, ymm0, ymm0", "vxorps ymm1, ymm1, ymm1", "vxorps ymm2, ymm2, ymm2",
            "vxorps ymm3, ymm3, ymm3", "vxorps ymm4, ymm4, ymm4", "vxorps ymm5, ymm5, ymm5",
            "vxorps ymm6, ymm6, ymm6", "vxorps ymm7, ymm7, ymm7", "vxorps ymm14, ymm14, ymm14",
            "vxorps ymm15, ymm15, ymm15",
            "2:",
            "vfmadd231ps ymm0, ymm14, ymm15", "vfmadd231ps ymm1, ymm14, ymm15",
            "vfmadd231ps ymm2, ymm14, ymm15", "vfmadd231ps ymm3, ymm14, ymm15",
            "vfmadd231ps ymm4, ymm14, ymm15", "vfmadd231ps ymm5, ymm14, ymm15",
            "vfmadd231ps ymm6, ymm14, ymm15", "vfmadd231ps ymm7, ymm14, ymm15",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iterations => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
            out("ymm6") _, out("ymm7") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        );
    }

    /// 8 × (`vpmaddubsw`, `vpmaddwd` by ones, `vpaddd`): 32 u8 × i8 multiply-accumulates each, per iteration.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn u8_i8(iterations: usize) {
        asm!(
            "vpxor ymm0, ymm0, ymm0", "vpxor ymm1, ymm1, ymm1", "vpxor ymm2, ymm2, ymm2",
            "vpxor ymm3, ymm3, ymm3", "vpxor ymm4, ymm4, ymm4", "vpxor ymm5, ymm5, ymm5",
            "vpxor ymm6, ymm6, ymm6", "vpxor ymm7, ymm7, ymm7", "vpxor ymm8, ymm8, ymm8",
            "vpxor ymm9, ymm9, ymm9", "vpxor ymm15, ymm15, ymm15",
            "vpcmpeqw ymm14, ymm14, ymm14", "vpsrlw ymm14, ymm14, 15",
            "2:",
            "vpmaddubsw ymm12, ymm8, ymm15", "vpmaddwd ymm12, ymm12, ymm14", "vpaddd ymm0, ymm0, ymm12",
            "vpmaddubsw ymm13, ymm9, ymm15", "vpmaddwd ymm13, ymm13, ymm14", "vpaddd ymm1, ymm1, ymm13",
            "vpmaddubsw ymm12, ymm8, ymm15", "vpmaddwd ymm12, ymm12, ymm14", "vpaddd ymm2, ymm2, ymm12",
            "vpmaddubsw ymm13, ymm9, ymm15", "vpmaddwd ymm13, ymm13, ymm14", "vpaddd ymm3, ymm3, ymm13",
            "vpmaddubsw ymm12, ymm8, ymm15", "vpmaddwd ymm12, ymm12, ymm14", "vpaddd ymm4, ymm4, ymm12",
            "vpmaddubsw ymm13, ymm9, ymm15", "vpmaddwd ymm13, ymm13, ymm14", "vpaddd ymm5, ymm5, ymm13",
            "vpmaddubsw ymm12, ymm8, ymm15", "vpmaddwd ymm12, ymm12, ymm14", "vpaddd ymm6, ymm6, ymm12",
            "vpmaddubsw ymm13, ymm9, ymm15", "vpmaddwd ymm13, ymm13, ymm14", "vpaddd ymm7, ymm7, ymm13",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iterations => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
            out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _, out("ymm12") _, out("ymm13") _,
            out("ymm14") _, out("ymm15") _,
            options(nostack),
        );
    }

    /// 8 × (`vpmaddwd`, `vpaddd`): 16 i16 × i16 multiply-accumulates each, per iteration (what
    /// `mtl_nn::cpu::int8_avx2` runs: the int8 values widened to 16 bits, exact and without saturation).
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn i16_i16(iterations: usize) {
        asm!(
            "vpxor ymm0, ymm0, ymm0", "vpxor ymm1, ymm1, ymm1", "vpxor ymm2, ymm2, ymm2",
            "vpxor ymm3, ymm3, ymm3", "vpxor ymm4, ymm4, ymm4", "vpxor ymm5, ymm5, ymm5",
            "vpxor ymm6, ymm6, ymm6", "vpxor ymm7, ymm7, ymm7", "vpxor ymm8, ymm8, ymm8",
            "vpxor ymm9, ymm9, ymm9", "vpxor ymm15, ymm15, ymm15",
            "2:",
            "vpmaddwd ymm12, ymm8, ymm15", "vpaddd ymm0, ymm0, ymm12",
            "vpmaddwd ymm13, ymm9, ymm15", "vpaddd ymm1, ymm1, ymm13",
            "vpmaddwd ymm12, ymm8, ymm15", "vpaddd ymm2, ymm2, ymm12",
            "vpmaddwd ymm13, ymm9, ymm15", "vpaddd ymm3, ymm3, ymm13",
            "vpmaddwd ymm12, ymm8, ymm15", "vpaddd ymm4, ymm4, ymm12",
            "vpmaddwd ymm13, ymm9, ymm15", "vpaddd ymm5, ymm5, ymm13",
            "vpmaddwd ymm12, ymm8, ymm15", "vpaddd ymm6, ymm6, ymm12",
            "vpmaddwd ymm13, ymm9, ymm15", "vpaddd ymm7, ymm7, ymm13",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iterations => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
            out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _, out("ymm12") _, out("ymm13") _,
            out("ymm15") _,
            options(nostack),
        );
    }

    /// 8 × `vpdpbusd` (AVX-VNNI or AVX512-VNNI on 256-bit registers: 32 u8 × i8 multiply-accumulates each).
    ///
    /// # Safety
    /// The CPU has AVX512-VNNI and AVX512-VL.
    #[target_feature(enable = "avx512vnni,avx512vl")]
    pub unsafe fn vnni(iterations: usize) {
        asm!(
            "vpxor ymm0, ymm0, ymm0", "vpxor ymm1, ymm1, ymm1", "vpxor ymm2, ymm2, ymm2",
            "vpxor ymm3, ymm3, ymm3", "vpxor ymm4, ymm4, ymm4", "vpxor ymm5, ymm5, ymm5",
            "vpxor ymm6, ymm6, ymm6", "vpxor ymm7, ymm7, ymm7", "vpxor ymm14, ymm14, ymm14",
            "vpxor ymm15, ymm15, ymm15",
            "2:",
            "vpdpbusd ymm0, ymm14, ymm15", "vpdpbusd ymm1, ymm14, ymm15", "vpdpbusd ymm2, ymm14, ymm15",
            "vpdpbusd ymm3, ymm14, ymm15", "vpdpbusd ymm4, ymm14, ymm15", "vpdpbusd ymm5, ymm14, ymm15",
            "vpdpbusd ymm6, ymm14, ymm15", "vpdpbusd ymm7, ymm14, ymm15",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iterations => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
            out("ymm6") _, out("ymm7") _, out("ymm14") _, out("ymm15") _,
            options(nostack),
        );
    }
}

/// Prints each mix's rate in multiply-accumulates per second on one core, and the int8 mixes' ratio to f32's,
/// then one JSON line.
pub fn rates() -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        anyhow::ensure!(
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            "rates: this CPU has no AVX2 and FMA"
        );
        let per_second = |macs_per_iteration: f64, seconds: f64| macs_per_iteration * ITERATIONS as f64 / seconds;
        // SAFETY: AVX2 and FMA are present (checked above).
        let f32_rate = per_second(64.0, best(|n| unsafe { x86::fma_f32(n) }));
        // SAFETY: as above.
        let int8_rate = per_second(256.0, best(|n| unsafe { x86::u8_i8(n) }));
        // SAFETY: as above.
        let i16_rate = per_second(128.0, best(|n| unsafe { x86::i16_i16(n) }));
        let vnni_rate = (is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"))
            // SAFETY: AVX512-VNNI and AVX512-VL are present (checked on this line).
            .then(|| per_second(256.0, best(|n| unsafe { x86::vnni(n) })));
        println!("f32 FMA (256-bit)                       {:7.1} G multiply-accumulates/s per core", f32_rate / 1e9);
        println!(
            "u8 x i8 maddubs + madd + add (AVX2)     {:7.1} G multiply-accumulates/s per core = {:.2}x f32",
            int8_rate / 1e9,
            int8_rate / f32_rate
        );
        println!(
            "i16 x i16 madd + add (AVX2)             {:7.1} G multiply-accumulates/s per core = {:.2}x f32",
            i16_rate / 1e9,
            i16_rate / f32_rate
        );
        if let Some(v) = vnni_rate {
            println!(
                "u8 x i8 vpdpbusd (VNNI, 256-bit)        {:7.1} G multiply-accumulates/s per core = {:.2}x f32",
                v / 1e9,
                v / f32_rate
            );
        }
        println!(
            "{}",
            serde_json::json!({"engine": "mtl", "workload": "rates", "f32_fma": f32_rate, "u8_i8_avx2": int8_rate, "i16_i16_avx2": i16_rate,
                "u8_i8_vnni": vnni_rate, "avx2_int8_over_f32": int8_rate / f32_rate})
        );
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    anyhow::bail!("rates: x86-64 only")
}
