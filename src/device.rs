//! Where a command's tensors live: `--device auto|cpu|cuda|cuda:N`, resolved once per command.
//!
//! A CUDA build (`--features cuda`, see tools/build-cuda.sh) defaults to the first GPU when
//! one is present; the default build has only the CPU.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// The device a command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DeviceChoice {
    /// The first GPU of a CUDA build when one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A GPU by its CUDA ordinal.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: use auto, cpu, cuda or cuda:N (N = 0, 1, ...)")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "--device {0}: this kdllm was built without CUDA; rebuild it with `tools/build-cuda.sh` (it installs the CUDA 13.0 toolkit from PyPI and runs `cargo build --release --features cuda`), or use --device cpu"
    )]
    NotBuilt(DeviceChoice),
    #[error("--device cuda:{ordinal}: this machine has {count} GPU(s), cuda:0 to cuda:{}; pick one of them", count.saturating_sub(1))]
    NoSuchGpu { ordinal: usize, count: usize },
    #[error("--device {choice}: no usable NVIDIA GPU ({message}); check the driver (nvidia-smi) or use --device cpu")]
    NoGpu { choice: DeviceChoice, message: String },
    #[error(
        "{what} needs about {need_gib:.1} GiB of GPU memory, but cuda:{ordinal} has {free_gib:.1} GiB free of {total_gib:.1} GiB; free the GPU, pick another with --device cuda:N, or use a smaller model or batch"
    )]
    OutOfMemory { what: String, ordinal: usize, need_gib: f64, free_gib: f64, total_gib: f64 },
    #[error("bf16 needs a GPU of compute capability 8.0 or newer (Ampere); cuda:{ordinal} is {major}.{minor}: use --dtype f32")]
    NoBf16 { ordinal: usize, major: i32, minor: i32 },
}

/// The candle device for `choice`.
pub fn resolve(choice: DeviceChoice) -> Result<Device, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(if gpu_count() > 0 { cuda(0, choice)? } else { Device::Cpu }),
        DeviceChoice::Cuda(n) if !cfg!(feature = "cuda") => {
            let _ = n;
            Err(DeviceError::NotBuilt(choice))
        }
        DeviceChoice::Cuda(n) => {
            let count = gpu_count();
            if n >= count && count > 0 {
                return Err(DeviceError::NoSuchGpu { ordinal: n, count });
            }
            cuda(n, choice)
        }
    }
}

/// How many GPUs this build can use (0 without the `cuda` feature or a driver).
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda::cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

fn cuda(ordinal: usize, choice: DeviceChoice) -> Result<Device, DeviceError> {
    Device::new_cuda(ordinal).map_err(|e| DeviceError::NoGpu { choice, message: e.to_string() })
}

/// Refuses work that needs about `bytes` of GPU memory when the device has less free; nothing
/// to check on the CPU.
pub fn check_memory(device: &Device, bytes: u64, what: &str) -> Result<(), DeviceError> {
    let Some((ordinal, free, total)) = memory(device) else { return Ok(()) };
    if bytes as u128 > free as u128 {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        return Err(DeviceError::OutOfMemory {
            what: what.to_string(),
            ordinal,
            need_gib: gib(bytes as f64),
            free_gib: gib(free as f64),
            total_gib: gib(total as f64),
        });
    }
    Ok(())
}

/// Refuses a dtype the device cannot compute in (bf16 before compute capability 8.0).
pub fn check_dtype(device: &Device, dtype: DType) -> Result<(), DeviceError> {
    match (dtype, capability(device)) {
        (DType::BF16, Some((ordinal, (major, minor)))) if major < 8 => {
            Err(DeviceError::NoBf16 { ordinal, major, minor })
        }
        _ => Ok(()),
    }
}

/// (ordinal, free bytes, total bytes) of a GPU; None on the CPU.
fn memory(device: &Device) -> Option<(usize, usize, usize)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let ctx = d.cuda_stream().context().clone();
        return ctx.mem_get_info().ok().map(|(free, total)| (ctx.ordinal(), free, total));
    }
    let _ = device;
    None
}

/// (ordinal, (major, minor)) of a GPU; None on the CPU.
fn capability(device: &Device) -> Option<(usize, (i32, i32))> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let ctx = d.cuda_stream().context().clone();
        return ctx.compute_capability().ok().map(|c| (ctx.ordinal(), c));
    }
    let _ = device;
    None
}

/// A short name for logs and reports: `cpu`, `cuda:0`.
pub fn name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => format!("cuda:{}", d.cuda_stream().context().ordinal()),
        _ => format!("{device:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_flags_parse_and_print_back() {
        for (text, choice) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>(), Ok(choice));
            if text != "cuda" {
                assert_eq!(choice.to_string(), text);
            }
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("use auto, cpu, cuda or cuda:N"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_cpu_needs_no_checks() {
        assert!(matches!(resolve(DeviceChoice::Cpu), Ok(Device::Cpu)));
        check_memory(&Device::Cpu, u64::MAX, "a model").unwrap();
        check_dtype(&Device::Cpu, DType::BF16).unwrap();
        assert_eq!(name(&Device::Cpu), "cpu");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_says_how_to_get_cuda() {
        assert!(matches!(resolve(DeviceChoice::Auto), Ok(Device::Cpu)));
        let err = resolve(DeviceChoice::Cuda(1)).unwrap_err().to_string();
        assert!(err.contains("--device cuda:1: this kdllm was built without CUDA"), "{err}");
        assert!(err.contains("tools/build-cuda.sh") && err.contains("--features cuda"), "{err}");
    }
}
