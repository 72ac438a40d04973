//! Target images, decompressed once from their payloads and memory-mapped for diffs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use tokio::sync::OnceCell;

use crate::digest::Digest;
use crate::manifest::Manifest;

pub struct ImageStore {
    dir: PathBuf,
    repo_root: PathBuf,
    /// Bound of the decompressed images on disk: any client can name any version ever
    /// published, so without it the cache would grow to the whole history.
    max_bytes: u64,
    loaded: Mutex<HashMap<Digest, Arc<OnceCell<Arc<Mmap>>>>>,
}

impl ImageStore {
    pub fn new(dir: PathBuf, repo_root: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(ImageStore {
            dir,
            repo_root,
            max_bytes,
            loaded: Mutex::new(HashMap::new()),
        })
    }

    /// Removes the least recently used images until the rest fit the bound; never `keep`.
    /// A mapped image that is removed stays valid for the diffs using it (the mapping
    /// holds it); the next request for it decompresses it again.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let is_image = m.is_file() && e.file_name().to_str()?.ends_with(".img");
                is_image.then_some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path == keep || std::fs::remove_file(&path).is_err() {
                continue;
            }
            total -= len;
            let digest = path
                .file_stem()
                .and_then(|n| n.to_str())
                .and_then(|hex| format!("blake3:{hex}").parse::<Digest>().ok());
            if let Some(d) = digest {
                self.loaded.lock().unwrap_or_else(|e| e.into_inner()).remove(&d);
            }
            tracing::info!(image = %path.display(), "evicted a decompressed image from the cache");
        }
    }

    /// The target image of `m`, mapped read-only. The first request for an image
    /// decompresses the payload and checks it against the manifest's image digest;
    /// concurrent requests wait for that one decompression.
    pub async fn get(&self, m: &Manifest) -> Result<Arc<Mmap>, String> {
        let cell = {
            let mut map = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(m.image.digest).or_default().clone()
        };
        let path = self.dir.join(format!("{}.img", m.image.digest.hex()));
        let payload = self.repo_root.join(&m.payload.path);
        let (digest, size) = (m.image.digest, m.image.size);
        let image = {
            let path = path.clone();
            cell.get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || load(path, payload, digest, size))
                    .await
                    .map_err(|e| format!("image task failed: {e}"))?
            })
            .await
            .cloned()?
        };
        // Marks the image as recently used, then keeps the cache within its bound.
        if let Ok(f) = File::options().append(true).open(&path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        self.evict(&path);
        Ok(image)
    }
}

fn load(path: PathBuf, payload: PathBuf, digest: Digest, size: u64) -> Result<Arc<Mmap>, String> {
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(size) {
        let tmp = crate::fsutil::temp_path(&path);
        let result = (|| {
            let src = File::open(&payload).map_err(|e| format!("cannot open payload {}: {e}", payload.display()))?;
            let out = File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
            let mut hashing = crate::digest::HashingWriter::new(BufWriter::new(out));
            let dec = zstd::stream::read::Decoder::new(src).map_err(|e| e.to_string())?;
            std::io::copy(&mut std::io::Read::take(dec, size + 1), &mut hashing)
                .map_err(|e| format!("cannot decompress payload: {e}"))?;
            let (mut w, got, len) = hashing.finish();
            w.flush().map_err(|e| e.to_string())?;
            if len != size || got != digest {
                return Err(format!(
                    "payload {} does not decompress to the image its manifest names",
                    payload.display()
                ));
            }
            std::fs::rename(&tmp, &path).map_err(|e| e.to_string())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
    }
    let f = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: the file is private to the server's cache directory and never modified after
    // its atomic rename into place.
    let map = unsafe { Mmap::map(&f) }.map_err(|e| format!("cannot map {}: {e}", path.display()))?;
    Ok(Arc::new(map))
}
