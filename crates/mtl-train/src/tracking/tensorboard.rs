//! TensorBoard event files, written directly: TFRecord framing (length, masked CRC-32C, payload, masked
//! CRC-32C) around hand-encoded `Event` protocol buffers holding scalar summaries, the format of
//! `tensorboard/compat/proto/event.proto` and `summary.proto` that TensorBoard's own reader opens.

use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), as TFRecord frames use it.
pub fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78;
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, entry) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            *entry = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, (field << 3) | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` with `wall_time`, `step` and either the file version or a summary of scalars.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(String, f32)]) -> Vec<u8> {
    let mut e = Vec::new();
    varint(&mut e, (1 << 3) | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(&mut e, 2 << 3);
    varint(&mut e, step as u64);
    if let Some(version) = file_version {
        bytes_field(&mut e, 3, version.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            varint(&mut v, (2 << 3) | 5);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

/// One TFRecord frame around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked(crc32c(&len)).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked(crc32c(data)).to_le_bytes());
    r
}

/// Appends scalar events to one events file.
pub struct EventWriter {
    file: std::io::BufWriter<std::fs::File>,
    pub path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.SECONDS.mtl`, starting with the file-version event.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let path = dir.join(format!("events.out.tfevents.{}.mtl", now.as_secs()));
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut w = Self { file, path };
        w.file.write_all(&record(&event(now.as_secs_f64(), 0, Some("brain.Event:2"), &[])))?;
        Ok(w)
    }

    /// Writes the scalars of one step (at wall time `wall_time`, seconds since the epoch).
    pub fn scalars(&mut self, step: usize, wall_time: f64, scalars: &[(String, f32)]) -> std::io::Result<()> {
        self.file.write_all(&record(&event(wall_time, step as i64, None, scalars)))
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The standard check value of CRC-32C (RFC 3720, appendix B.4).
    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_and_frames() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, vec![0xAC, 0x02]);
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
    }
}
