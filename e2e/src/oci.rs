//! The OCI image Istio's agent pulls for a WasmPlugin, built without Docker: the "compat"
//! variant of the Wasm image spec, one `application/vnd.oci.image.layer.v1.tar+gzip` layer
//! holding `plugin.wasm`, as `docker build` of `FROM scratch` + `COPY plugin.wasm` would give.
//! Written as an OCI image layout (a directory) and as an `oci-archive` tarball of it. Every
//! byte is a function of the .wasm and the tag (no timestamps, fixed owners and modes), so the
//! same build gives the same digest.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The file name Istio's agent looks for in the layer.
pub const PLUGIN_FILE: &str = "plugin.wasm";

pub fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    format!("sha256:{}", d.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256(bytes), "size": bytes.len()})
}

fn tar_entry(out: &mut tar::Builder<Vec<u8>>, path: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    out.append_data(&mut h, path, bytes)
}

/// The layer: `plugin.wasm` in a tar, gzipped. Returns (uncompressed tar, tar.gz).
pub fn layer(wasm: &[u8]) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut t = tar::Builder::new(Vec::new());
    tar_entry(&mut t, PLUGIN_FILE, wasm, 0o644)?;
    let tar = t.into_inner()?;
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar)?;
    Ok((tar.clone(), gz.finish()?))
}

/// An image: its blobs by digest, and the manifest's digest (what `@sha256:` refers to).
pub struct Image {
    pub manifest_digest: String,
    pub layer_digest: String,
    pub blobs: Vec<(String, Vec<u8>)>,
    pub index: Vec<u8>,
}

pub fn image(wasm: &[u8], version: &str) -> io::Result<Image> {
    let (tar, gz) = layer(wasm)?;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]},
    }))?;
    let mut layer_desc = descriptor(LAYER, &gz);
    layer_desc["annotations"] = json!({"org.opencontainers.image.title": PLUGIN_FILE});
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": descriptor(CONFIG, &config),
        "layers": [layer_desc],
        "annotations": {
            "org.opencontainers.image.title": "close-relay",
            "org.opencontainers.image.description":
                "close-relay proxy-wasm filter for Istio sidecars (HTTP and NETWORK WasmPlugins)",
            "org.opencontainers.image.version": version,
        },
    }))?;
    let mut manifest_desc = descriptor(MANIFEST, &manifest);
    manifest_desc["annotations"] = json!({"org.opencontainers.image.ref.name": version});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [manifest_desc],
    }))?;
    Ok(Image {
        manifest_digest: sha256(&manifest),
        layer_digest: sha256(&gz),
        blobs: vec![(sha256(&config), config), (sha256(&gz), gz), (sha256(&manifest), manifest)],
        index,
    })
}

fn blob_path(digest: &str) -> PathBuf {
    Path::new("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Writes the image as an OCI image layout in `dir` (replaced) and as `archive`, a tarball of
/// that layout (skopeo's `oci-archive:` transport).
pub fn write(image: &Image, dir: &Path, archive: &Path) -> io::Result<()> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), LAYOUT)?;
    fs::write(dir.join("index.json"), &image.index)?;
    let mut t = tar::Builder::new(Vec::new());
    tar_entry(&mut t, "oci-layout", LAYOUT, 0o644)?;
    tar_entry(&mut t, "index.json", &image.index, 0o644)?;
    for (digest, bytes) in &image.blobs {
        fs::write(dir.join(blob_path(digest)), bytes)?;
        tar_entry(&mut t, &blob_path(digest).to_string_lossy(), bytes, 0o644)?;
    }
    fs::write(archive, t.into_inner()?)
}

fn read_json(path: &Path) -> Result<Value, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// A blob of a layout, checked against its digest.
fn blob(dir: &Path, desc: &Value) -> Result<Vec<u8>, String> {
    let digest = desc["digest"].as_str().ok_or("descriptor without a digest")?;
    let bytes = fs::read(dir.join(blob_path(digest))).map_err(|e| format!("blob {digest}: {e}"))?;
    if sha256(&bytes) != digest || desc["size"].as_u64() != Some(bytes.len() as u64) {
        return Err(format!("blob {digest} does not match its descriptor"));
    }
    Ok(bytes)
}

/// What an image layout holds, read as Istio's agent reads a pulled image: the manifest (its
/// digest and media types) and the bytes of `plugin.wasm` from the last layer.
#[derive(Debug)]
pub struct Pulled {
    pub manifest_digest: String,
    pub manifest: Value,
    pub wasm: Vec<u8>,
}

/// Reads the only image in the layout at `dir`.
pub fn read(dir: &Path) -> Result<Pulled, String> {
    let index = read_json(&dir.join("index.json"))?;
    let [desc] = index["manifests"].as_array().map(Vec::as_slice).unwrap_or_default() else {
        return Err(format!("{}: expected one manifest in index.json", dir.display()));
    };
    let manifest_bytes = blob(dir, desc)?;
    let manifest: Value = serde_json::from_slice(&manifest_bytes).map_err(|e| e.to_string())?;
    let layer = manifest["layers"].as_array().and_then(|l| l.last()).ok_or("no layers")?;
    if layer["mediaType"] != LAYER {
        return Err(format!("last layer is {}, not {LAYER}", layer["mediaType"]));
    }
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(blob(dir, layer)?.as_slice())
        .read_to_end(&mut tar)
        .map_err(|e| format!("layer is not gzip: {e}"))?;
    let mut archive = tar::Archive::new(tar.as_slice());
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let is_plugin = entry.path().map_err(|e| e.to_string())?.file_name() == Some(PLUGIN_FILE.as_ref());
        if is_plugin {
            let mut wasm = Vec::new();
            entry.read_to_end(&mut wasm).map_err(|e| e.to_string())?;
            return Ok(Pulled { manifest_digest: sha256(&manifest_bytes), manifest, wasm });
        }
    }
    Err(format!("{PLUGIN_FILE} not in the layer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_wasm_same_digest_and_the_layout_reads_back() {
        let wasm = b"\0asm\x01\0\0\0 not really a module".to_vec();
        let a = image(&wasm, "0.1.0").unwrap();
        let b = image(&wasm, "0.1.0").unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_ne!(a.manifest_digest, image(b"\0asm other", "0.1.0").unwrap().manifest_digest);
        let dir = std::env::temp_dir().join(format!("close-relay-oci-{}", std::process::id()));
        let archive = dir.with_extension("tar");
        write(&a, &dir, &archive).unwrap();
        let pulled = read(&dir).unwrap();
        assert_eq!(pulled.wasm, wasm);
        assert_eq!(pulled.manifest_digest, a.manifest_digest);
        assert_eq!(pulled.manifest["layers"][0]["mediaType"], LAYER);
        assert_eq!(pulled.manifest["config"]["mediaType"], CONFIG);
        // A corrupted blob is refused.
        let layer_file = dir.join(blob_path(&a.layer_digest));
        let mut bytes = fs::read(&layer_file).unwrap();
        bytes[20] ^= 1;
        fs::write(&layer_file, bytes).unwrap();
        assert!(read(&dir).unwrap_err().contains("does not match"));
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_file(&archive);
    }
}
