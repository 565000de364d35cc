//! `make oci` / `make push`: builds close-relay's OCI image without Docker, and writes the Istio
//! manifests that reference a pushed image.
//!   oci build WASM LAYOUT_DIR ARCHIVE VERSION   prints the manifest digest
//!   oci render IMAGE OUT_DIR                     IMAGE = oci://registry/close-relay@sha256:...

use std::fs;
use std::path::Path;
use std::process::exit;

use e2e::istio::EXAMPLE_IMAGE;

fn fail(msg: String) -> ! {
    eprintln!("oci: {msg}");
    exit(1)
}

fn build(wasm: &str, layout: &str, archive: &str, version: &str) {
    let bytes = fs::read(wasm).unwrap_or_else(|e| fail(format!("{wasm}: {e} (run `make build`)")));
    let image = e2e::oci::image(&bytes, version).unwrap_or_else(|e| fail(e.to_string()));
    e2e::oci::write(&image, Path::new(layout), Path::new(archive)).unwrap_or_else(|e| fail(e.to_string()));
    let (raw, gz) = e2e::oci::layer(&bytes).unwrap_or_else(|e| fail(e.to_string()));
    eprintln!(
        "oci: {layout} (and {archive}): plugin.wasm {} B, tar {} B, layer {} B gzipped",
        bytes.len(),
        raw.len(),
        gz.len()
    );
    println!("{}", image.manifest_digest);
}

fn render(image: &str, out: &str) {
    if !image.starts_with("oci://") || !image.contains("@sha256:") {
        fail(format!("expected oci://REGISTRY/close-relay@sha256:DIGEST, got {image}"));
    }
    let root = e2e::repo_root().join("envoyfilter");
    fs::create_dir_all(out).unwrap_or_else(|e| fail(format!("{out}: {e}")));
    // Every manifest that names the image, as `OUT_DIR/<name>`.
    let manifests = [
        ("trafficextension/trafficextension.yaml", "trafficextension.yaml"),
        ("wasmplugin/wasmplugin.yaml", "wasmplugin.yaml"),
        ("envoyfilter.yaml", "envoyfilter.yaml"),
        ("lean/trafficextension/trafficextension.yaml", "lean-trafficextension.yaml"),
        ("lean/wasmplugin/wasmplugin.yaml", "lean-wasmplugin.yaml"),
    ];
    for (file, name) in manifests {
        let text = fs::read_to_string(root.join(file)).unwrap_or_else(|e| fail(format!("{file}: {e}")));
        if !text.contains(EXAMPLE_IMAGE) {
            fail(format!("{file} does not mention {EXAMPLE_IMAGE}"));
        }
        let dest = Path::new(out).join(name);
        fs::write(&dest, text.replace(EXAMPLE_IMAGE, image)).unwrap_or_else(|e| fail(format!("{}: {e}", dest.display())));
        eprintln!("oci: wrote {} with {image}", dest.display());
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["build", wasm, layout, archive, version] => build(wasm, layout, archive, version),
        ["render", image, out] => render(image, out),
        _ => fail("usage: oci build WASM LAYOUT_DIR ARCHIVE VERSION | oci render IMAGE OUT_DIR".into()),
    }
}
