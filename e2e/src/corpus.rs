//! llhttp's HTTP/1.1 test fixtures (`../shared/corpora/llhttp`, MIT) as raw messages: a public
//! corpus nobody here wrote, for the comparisons with a plain Envoy (`tests/corpus.rs`).
//! Decoded as that directory's `SOURCE.md` says, which is how llhttp's own `test/md-test.ts`
//! reads them.

use std::fs;
use std::path::{Path, PathBuf};

/// Which side of HTTP a fixture is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// What a client sends.
    Request,
    /// What an app answers.
    Response,
}

#[derive(Debug, Clone)]
pub struct Case {
    /// `request/connection.md: Setting flag`.
    pub name: String,
    pub kind: Kind,
    pub bytes: Vec<u8>,
}

impl Case {
    /// A request that asks for a head only: its answers carry no body.
    pub fn is_head(&self) -> bool {
        self.kind == Kind::Request && self.bytes.starts_with(b"HEAD ")
    }
}

/// The corpus directory: `../shared/corpora/llhttp` beside the checkout, or `$LLHTTP_CORPUS`.
pub fn dir() -> PathBuf {
    std::env::var_os("LLHTTP_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("../shared/corpora/llhttp"))
}

/// Every fixture of `request/*.md` and `response/*.md` under `dir`, in file order. Panics when
/// the corpus is missing: a comparison over nothing would pass by proving nothing.
pub fn load(dir: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    for side in ["request", "response"] {
        let mut files: Vec<PathBuf> = fs::read_dir(dir.join(side))
            .unwrap_or_else(|e| panic!("the llhttp corpus is not at {}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "md"))
            .collect();
        files.sort();
        for file in files {
            let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let label = format!("{side}/{}", file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
            cases.extend(parse(&label, &text));
        }
    }
    cases
}

/// The fixtures of one markdown file: each `<!-- meta={"type": ...} -->` followed by a
/// fenced `http` block, named after the heading above it.
pub fn parse(label: &str, text: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let (mut heading, mut kind, mut block): (&str, Option<Kind>, Option<Vec<&str>>) = ("", None, None);
    for line in text.lines() {
        if let Some(lines) = block.as_mut() {
            if line.starts_with("```") {
                if let (Some(kind), Some(lines)) = (kind.take(), block.take()) {
                    cases.push(Case { name: format!("{label}: {heading}"), kind, bytes: decode(&lines.join("\n")) });
                }
            } else {
                lines.push(line);
            }
        } else if line.starts_with('#') {
            heading = line.trim_start_matches('#').trim();
        } else if let Some(meta) = line.strip_prefix("<!-- meta=") {
            kind = if meta.contains("\"request") {
                Some(Kind::Request)
            } else if meta.contains("\"response") {
                Some(Kind::Response)
            } else {
                None
            };
        } else if line.trim() == "```http" && kind.is_some() {
            block = Some(Vec::new());
        }
    }
    cases
}

/// A fixture's http block as bytes. `block` is its lines joined with `\n`, the block's final
/// newline dropped; a backslash before a line end joins the lines, every other line end becomes
/// CRLF, then `\r`, `\n`, `\t`, `\f`, `\xHH` and octal `\NNN` become their bytes.
pub fn decode(block: &str) -> Vec<u8> {
    let joined = block.replace("\\\n", "");
    let text = joined.replace('\n', "\r\n");
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'\\' || i + 1 >= bytes.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let (byte, used) = match bytes[i + 1] {
            b'r' => (b'\r', 2),
            b'n' => (b'\n', 2),
            b't' => (b'\t', 2),
            b'f' => (0x0c, 2),
            b'x' => match bytes.get(i + 2..i + 4).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()) {
                Some(v) => (v, 4),
                None => (b'\\', 1),
            },
            b'0'..=b'7' => {
                let digits = bytes[i + 1..].iter().take(3).take_while(|d| (b'0'..=b'7').contains(d)).count();
                let octal = std::str::from_utf8(&bytes[i + 1..i + 1 + digits]).ok().and_then(|o| u8::from_str_radix(o, 8).ok());
                match octal {
                    Some(v) => (v, 1 + digits),
                    None => (b'\\', 1),
                }
            }
            _ => (b'\\', 1),
        };
        out.push(byte);
        i += used;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_decode_as_llhttp_reads_them() {
        assert_eq!(decode("GET / HTTP/1.1\nHost: a\n\n"), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(decode("X: a\\\nb"), b"X: ab", "a backslash joins lines");
        assert_eq!(decode("A\\r\\nB\\t\\x41\\101\\0"), b"A\r\nB\tAA\0");
        assert_eq!(decode("\\q"), b"\\q", "an unknown escape stays as written");
    }

    #[test]
    fn fixtures_are_found_under_their_heading() {
        let md = "## Keep\n\n<!-- meta={\"type\": \"request\"} -->\n```http\nGET / HTTP/1.1\n\n\n```\n\n```log\nx\n```\n\
                  ### Resp\n<!-- meta={\"type\": \"response-lenient-all\"} -->\n```http\nHTTP/1.1 200 OK\n\n```\n";
        let cases = parse("f.md", md);
        assert_eq!(cases.len(), 2);
        assert_eq!((cases[0].name.as_str(), cases[0].kind), ("f.md: Keep", Kind::Request));
        assert_eq!(cases[0].bytes, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!((cases[1].kind, cases[1].bytes.as_slice()), (Kind::Response, &b"HTTP/1.1 200 OK\r\n"[..]));
    }

    #[test]
    fn the_shared_corpus_is_whole() {
        let cases = load(&dir());
        let requests = cases.iter().filter(|c| c.kind == Kind::Request).count();
        assert_eq!((requests, cases.len() - requests), (166, 85), "llhttp 01e105a's request and response fixtures");
    }
}
