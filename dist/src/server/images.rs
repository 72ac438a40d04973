//! Target images, decompressed once from their payloads and memory-mapped for diffs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use memmap2::Mmap;
use tokio::sync::OnceCell;

use crate::digest::Digest;
use crate::manifest::Manifest;

pub struct ImageStore {
    dir: PathBuf,
    repo_root: PathBuf,
    loaded: Mutex<HashMap<Digest, Arc<OnceCell<Arc<Mmap>>>>>,
}

impl ImageStore {
    pub fn new(dir: PathBuf, repo_root: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(ImageStore {
            dir,
            repo_root,
            loaded: Mutex::new(HashMap::new()),
        })
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
        cell.get_or_try_init(|| async move {
            tokio::task::spawn_blocking(move || load(path, payload, digest, size))
                .await
                .map_err(|e| format!("image task failed: {e}"))?
        })
        .await
        .cloned()
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
