//! The shape of the source, kept by a scan of `crates/*/src`: no function
//! outside the tests runs longer than `MAX_FN_LINES` lines, and the modules
//! of a crate do not import one another in a cycle.
//!
//! A scan, not a parser: comments and the insides of string and char
//! literals are blanked first, so a brace in them is never counted, and
//! what remains is matched brace for brace. That is enough for code that
//! `cargo fmt` has laid out.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The longest a function may be, from its `fn` line to its closing brace.
const MAX_FN_LINES: usize = 80;

/// Each top-level module of a crate, and the top-level modules it names.
type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn no_function_is_longer_than_the_limit() {
    let mut offenders = Vec::new();
    for krate in crates() {
        for file in rust_files(&krate.join("src")) {
            for f in Code::new(&read(&file)).long_fns(MAX_FN_LINES) {
                let at = format!("{}:{}", relative(&file), f.line);
                offenders.push(format!("{at}: fn {} is {} lines", f.name, f.lines));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "functions longer than {MAX_FN_LINES} lines outside #[cfg(test)]; split them:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_modules_of_a_crate_do_not_import_each_other_in_a_cycle() {
    let mut found = Vec::new();
    for krate in crates() {
        for cycle in cycles(&module_graph(&sources(&krate.join("src")))) {
            found.push(format!("{}: {}", relative(&krate), cycle.join(" -> ")));
        }
    }
    assert!(
        found.is_empty(),
        "module import cycles (move what both need below both):\n{}",
        found.join("\n")
    );
}

/// The root of the workspace.
fn workspace() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
}

/// `path` as the workspace names it, for messages.
fn relative(path: &Path) -> String {
    let path = path.strip_prefix(workspace()).unwrap_or(path);
    path.display().to_string()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every crate directory of the workspace that has a `src`.
fn crates() -> Vec<PathBuf> {
    let mut crates: Vec<PathBuf> = fs::read_dir(workspace().join("crates"))
        .expect("the workspace has a crates directory")
        .map(|entry| entry.unwrap().path())
        .filter(|dir| dir.join("src").is_dir())
        .collect();
    crates.sort();
    assert!(!crates.is_empty(), "no crates found under the workspace");
    crates
}

/// The `.rs` files under `dir`, at any depth, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// One source file of a crate, as the module graph sees it.
struct Source {
    /// The top-level module it belongs to: `foo` for `foo.rs`, `foo/mod.rs`
    /// and everything else under `foo/`.
    module: String,
    /// How many `super::` lead from its top level to the crate root.
    depth: usize,
    text: String,
}

/// The files of the crate whose sources are in `src`, but for its root
/// (`lib.rs`, `main.rs`): the root declares every module, so it is above
/// them all and takes part in no cycle.
fn sources(src: &Path) -> Vec<Source> {
    let mut sources = Vec::new();
    for file in rust_files(src) {
        let rel = file.strip_prefix(src).unwrap();
        let parts: Vec<String> = rel
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if let [root] = &parts[..]
            && (root == "lib" || root == "main")
        {
            continue;
        }
        let depth = parts.len() - usize::from(parts.last().unwrap() == "mod");
        let module = parts[0].clone();
        sources.push(Source {
            module,
            depth,
            text: read(&file),
        });
    }
    sources
}

/// Which top-level modules each module's files name, through `crate::`
/// paths and the `super::` paths that climb to the crate root.
fn module_graph(sources: &[Source]) -> Graph {
    let modules: BTreeSet<&str> = sources.iter().map(|s| s.module.as_str()).collect();
    let mut graph = Graph::new();
    for source in sources {
        let named = graph.entry(source.module.clone()).or_default();
        for target in Code::new(&source.text).crate_paths(source.depth) {
            if target != source.module && modules.contains(target.as_str()) {
                named.insert(target);
            }
        }
    }
    graph
}

/// Every cycle a depth-first walk of `graph` closes, each as the modules
/// along it with the first one repeated at the end.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let mut walk = Walk {
        graph,
        path: Vec::new(),
        done: BTreeSet::new(),
        found: Vec::new(),
    };
    for module in graph.keys() {
        walk.visit(module);
    }
    walk.found
}

struct Walk<'g> {
    graph: &'g Graph,
    /// The modules from where the walk started down to where it is.
    path: Vec<&'g str>,
    /// Modules whose every path has been walked: no cycle is left there.
    done: BTreeSet<&'g str>,
    found: Vec<Vec<String>>,
}

impl<'g> Walk<'g> {
    fn visit(&mut self, module: &'g str) {
        if self.done.contains(module) {
            return;
        }
        if let Some(at) = self.path.iter().position(|&m| m == module) {
            let mut cycle: Vec<String> = self.path[at..].iter().map(|m| m.to_string()).collect();
            cycle.push(module.to_string());
            self.found.push(cycle);
            return;
        }
        self.path.push(module);
        for next in self.graph.get(module).into_iter().flatten() {
            self.visit(next);
        }
        self.path.pop();
        self.done.insert(module);
    }
}

/// A function found too long.
#[derive(Debug, PartialEq)]
struct LongFn {
    name: String,
    /// Where its `fn` is, from 1.
    line: usize,
    lines: usize,
}

/// Source text with comments and literals blanked to spaces (newlines
/// kept, so lines still count), and where its `#[cfg(test)]` items are.
struct Code {
    text: Vec<u8>,
    tests: Vec<Range<usize>>,
}

impl Code {
    fn new(src: &str) -> Code {
        let text = blank(src);
        let tests = find(&text, b"#[cfg(test)]")
            .map(|at| at..item_end(&text, at + b"#[cfg(test)]".len()))
            .collect();
        Code { text, tests }
    }

    fn in_tests(&self, at: usize) -> bool {
        self.tests.iter().any(|r| r.contains(&at))
    }

    /// The functions with a body, outside `#[cfg(test)]` items, longer
    /// than `limit` lines.
    fn long_fns(&self, limit: usize) -> Vec<LongFn> {
        let mut long = Vec::new();
        for (at, name) in self.items(b"fn") {
            let end = item_end(&self.text, at);
            if self.text[end - 1] != b'}' {
                continue; // a declaration in a trait or an extern block
            }
            let lines = line_of(&self.text, end - 1) - line_of(&self.text, at) + 1;
            if lines > limit {
                let line = line_of(&self.text, at);
                long.push(LongFn { name, line, lines });
            }
        }
        long
    }

    /// The `keyword name` items outside `#[cfg(test)]` items: where each
    /// keyword is, and the name.
    fn items(&self, keyword: &[u8]) -> Vec<(usize, String)> {
        let mut items = Vec::new();
        for at in find(&self.text, keyword) {
            let after = at + keyword.len();
            let spaced = self.text.get(after).is_some_and(u8::is_ascii_whitespace);
            if !spaced || ident_before(&self.text, at) || self.in_tests(at) {
                continue;
            }
            if let Some(name) = ident_at(&self.text, skip_space(&self.text, after)) {
                items.push((at, name));
            }
        }
        items
    }

    /// The first segment of every path outside `#[cfg(test)]` items that
    /// starts at the crate root: `crate::x`, `crate::{x, y::z}`, and
    /// `super::` climbed as many times as the code is deep below the root.
    /// `depth` is the depth of the file's top level; inline modules add one.
    fn crate_paths(&self, depth: usize) -> Vec<String> {
        let inline_mods: Vec<Range<usize>> = self
            .items(b"mod")
            .into_iter()
            .map(|(at, _)| at..item_end(&self.text, at))
            .collect();
        let mut heads = Vec::new();
        for at in find(&self.text, b"crate::") {
            if !self.in_tests(at) && path_starts(&self.text, at) {
                heads.extend(path_heads(&self.text, at + b"crate::".len()));
            }
        }
        for at in find(&self.text, b"super::") {
            if self.in_tests(at) || !path_starts(&self.text, at) {
                continue;
            }
            let mut end = at;
            let mut climbs = 0;
            while self.text[end..].starts_with(b"super::") {
                end += b"super::".len();
                climbs += 1;
            }
            let inside = inline_mods.iter().filter(|r| r.contains(&at)).count();
            if climbs == depth + inside {
                heads.extend(path_heads(&self.text, end));
            }
        }
        heads
    }
}

/// Whether a path starts at `at`: not the tail of another path or name.
fn path_starts(text: &[u8], at: usize) -> bool {
    !ident_before(text, at) && at.checked_sub(1).is_none_or(|i| !b":$".contains(&text[i]))
}

/// The first segment of the path that continues at `at`: one name, or for a
/// group `{a::b, c}` the first name of each member (`self` is the root).
fn path_heads(text: &[u8], at: usize) -> Vec<String> {
    if text.get(at) != Some(&b'{') {
        return ident_at(text, at).into_iter().collect();
    }
    let end = matching_brace(text, at);
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut member_starts = true;
    for i in at..end {
        match text[i] {
            b'{' => depth += 1,
            b'}' => depth -= 1,
            b',' if depth == 1 => member_starts = true,
            c if c.is_ascii_whitespace() => {}
            _ if depth == 1 && member_starts => {
                member_starts = false;
                heads.extend(ident_at(text, i).filter(|name| name != "self"));
            }
            _ => {}
        }
    }
    heads
}

/// Where the item whose text continues at `from` ends (one past it): after
/// its body's closing brace, or after the `;` that ends it, whichever
/// comes first outside parentheses and brackets (`[u8; 4]`).
fn item_end(text: &[u8], from: usize) -> usize {
    let mut nested = 0usize;
    for i in from..text.len() {
        match text[i] {
            b'(' | b'[' => nested += 1,
            b')' | b']' => nested = nested.saturating_sub(1),
            b';' if nested == 0 => return i + 1,
            b'{' if nested == 0 => return matching_brace(text, i) + 1,
            _ => {}
        }
    }
    text.len()
}

/// Where the brace that closes the one at `open` is (or the end of text).
fn matching_brace(text: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, &c) in text.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' if depth == 1 => return i,
            b'}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

/// Every place `needle` occurs in `text`.
fn find<'a>(text: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    text.windows(needle.len())
        .enumerate()
        .filter(move |(_, w)| *w == needle)
        .map(|(i, _)| i)
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn ident_before(text: &[u8], at: usize) -> bool {
    at.checked_sub(1).is_some_and(|i| is_ident(text[i]))
}

/// The identifier that starts at `at`, if one does.
fn ident_at(text: &[u8], at: usize) -> Option<String> {
    let rest = text.get(at..).unwrap_or_default();
    let name = &rest[..rest.iter().take_while(|&&c| is_ident(c)).count()];
    let starts = name.first().is_some_and(|c| !c.is_ascii_digit());
    starts.then(|| String::from_utf8_lossy(name).into_owned())
}

fn skip_space(text: &[u8], mut at: usize) -> usize {
    while text.get(at).is_some_and(u8::is_ascii_whitespace) {
        at += 1;
    }
    at
}

/// The line, from 1, that byte `at` is on.
fn line_of(text: &[u8], at: usize) -> usize {
    text[..at].iter().filter(|&&c| c == b'\n').count() + 1
}

/// `src` with every comment and every string, byte string, raw string and
/// char literal replaced by spaces, newlines kept. Lifetimes and labels
/// (`'a`, `'outer:`) stay.
fn blank(src: &str) -> Vec<u8> {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        i = match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => line_end(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => block_comment_end(b, i),
            b'"' => string_end(b, i + 1),
            b'r' | b'b' if !ident_before(b, i) => raw_string_end(b, i).unwrap_or(i + 1),
            b'\'' => char_end(src, i).unwrap_or(i + 1),
            _ => i + 1,
        };
        if i > start + 1 {
            for c in &mut out[start..i] {
                if *c != b'\n' {
                    *c = b' ';
                }
            }
        }
    }
    out
}

fn line_end(b: &[u8], from: usize) -> usize {
    b[from..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |n| from + n)
}

/// One past the end of the (possibly nested) block comment at `from`.
fn block_comment_end(b: &[u8], from: usize) -> usize {
    let mut depth = 0;
    let mut i = from;
    while i + 1 < b.len() {
        match &b[i..i + 2] {
            b"/*" => depth += 1,
            b"*/" if depth == 1 => return i + 2,
            b"*/" => depth -= 1,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    b.len()
}

/// One past the quote that closes the string whose text starts at `from`.
fn string_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// One past the end of the raw string (`r"…"`, `br#"…"#`) at `from`, if
/// one is there (`r#type` is a raw identifier, not a string).
fn raw_string_end(b: &[u8], from: usize) -> Option<usize> {
    let mut i = from + usize::from(b[from] == b'b');
    if b.get(i) != Some(&b'r') {
        return None;
    }
    i += 1;
    let hashes = b[i..].iter().take_while(|&&c| c == b'#').count();
    i += hashes;
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut close = vec![b'"'];
    close.extend(std::iter::repeat_n(b'#', hashes));
    let body = i + 1;
    let end = b[body..].windows(close.len()).position(|w| w == close);
    Some(end.map_or(b.len(), |n| body + n + close.len()))
}

/// One past the end of the char literal at `from` (`'{'`, `'\''`,
/// `'\u{7b}'`), or `None` for a lifetime or a label.
fn char_end(src: &str, from: usize) -> Option<usize> {
    let b = src.as_bytes();
    if b.get(from + 1) == Some(&b'\\') {
        let close = b[from + 3..].iter().position(|&c| c == b'\'')?;
        return Some(from + 3 + close + 1);
    }
    let c = src[from + 1..].chars().next()?;
    let after = from + 1 + c.len_utf8();
    (b.get(after) == Some(&b'\'')).then_some(after + 1)
}

mod scanner {
    use super::*;

    /// A function `name` of `body_lines` lines between its `fn` line and
    /// its closing brace.
    fn function(name: &str, body_lines: usize) -> String {
        let body = "    let x = 1;\n".repeat(body_lines);
        format!("fn {name}() {{\n{body}}}\n")
    }

    fn long(src: &str) -> Vec<LongFn> {
        Code::new(src).long_fns(MAX_FN_LINES)
    }

    #[test]
    fn a_long_function_is_caught_and_one_at_the_limit_is_not() {
        let src = function("fits", MAX_FN_LINES - 2) + &function("too_long", MAX_FN_LINES - 1);
        let found = long(&format!("use std::fs;\n\n{src}"));
        let line = MAX_FN_LINES + 3;
        let lines = MAX_FN_LINES + 1;
        assert_eq!(
            found,
            [LongFn {
                name: "too_long".into(),
                line,
                lines
            }]
        );
    }

    #[test]
    fn braces_in_literals_and_comments_are_not_counted() {
        // Each unbalanced brace below, if counted, would make `first` run
        // on through `second` and past the limit.
        let tricky = r###"fn first<'a>(x: &'a str) -> char {
    let s = "{ \" {";
    let c = '{';
    let q = '\'';
    let u = '\u{7b}';
    let b = b'{';
    let r = r#"{ "{" "#;
    // {
    /* { /* nested { */ { */
    'outer: loop { break 'outer; }
    '{'
}
"###;
        let src = format!("{tricky}{}", function("second", MAX_FN_LINES - 10));
        assert_eq!(long(&src), Vec::<LongFn>::new());
        assert_eq!(
            long(&(src + &function("third", MAX_FN_LINES)))[0].name,
            "third"
        );
    }

    #[test]
    fn a_cfg_test_module_and_declarations_are_skipped() {
        let inner = function("long_test", MAX_FN_LINES + 5).replace('\n', "\n    ");
        let src = format!(
            "trait T {{\n    fn declared(&self) -> [u8; 4];\n}}\n\n\
             #[cfg(test)]\nmod tests {{\n    use super::*;\n\n    {inner}\n}}\n"
        );
        assert_eq!(long(&src), Vec::<LongFn>::new());
        let src = src.replace("#[cfg(test)]", "");
        assert_eq!(long(&src)[0].name, "long_test");
    }

    fn source(module: &str, text: &str) -> Source {
        Source {
            module: module.into(),
            depth: 1,
            text: text.into(),
        }
    }

    #[test]
    fn a_two_module_cycle_is_found() {
        let sources = [
            source("a", "use crate::{b::B, c};\npub struct A;\n"),
            source("b", "pub struct B(super::a::A);\n"),
            source("c", "pub fn c() -> crate::SOFTWARE {}\n"),
        ];
        let graph = module_graph(&sources);
        assert_eq!(cycles(&graph), [["a", "b", "a"]]);
    }

    #[test]
    fn test_code_comments_and_inner_supers_make_no_edge() {
        let sources = [
            source(
                "a",
                "// use crate::b;\nmod inner {\n    use super::b;\n}\n\
                 #[cfg(test)]\nmod tests {\n    use crate::b;\n}\n",
            ),
            source("b", "use crate::a::A;\n"),
        ];
        let graph = module_graph(&sources);
        assert_eq!(cycles(&graph), Vec::<Vec<String>>::new());
        assert_eq!(graph["b"], BTreeSet::from(["a".to_string()]));
    }
}
