//! The library's top-level modules form a graph without cycles, and
//! `domain/` stays pure (DESIGN §2). Rust accepts modules that import each
//! other, so nothing else would notice a cycle coming back.
//!
//! An edge `a -> b` is any `crate::b` path (in a `use`, inline, or inside a
//! `crate::{...}` group) or `super::` path that climbs out to `b`, in any file
//! of `src/a`. Comments, string literals and items under `#[cfg(test)]` are
//! left out: a unit test may reach up the graph (the policy's test reads the
//! whole GraphQL schema) without the shipped code depending on it.
//!
//! `cargo test --test module_graph -- --nocapture` prints the graph.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

struct Token {
    tok: Tok,
    line: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Rust source as identifiers and punctuation, without comments and
/// literals' contents (a path written in a string or a doc comment is not a
/// dependency).
fn lex(src: &str) -> Vec<Token> {
    let s: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let at = |i: usize| s.get(i).copied().unwrap_or('\0');
    // Skips a string body from just after its opening quote.
    let skip_string = |mut i: usize, line: &mut usize| {
        while i < s.len() {
            match s[i] {
                '\\' => {
                    if s.get(i + 1) == Some(&'\n') {
                        *line += 1;
                    }
                    i += 2;
                }
                '"' => return i + 1,
                c => {
                    if c == '\n' {
                        *line += 1;
                    }
                    i += 1;
                }
            }
        }
        i
    };
    // Skips a raw string from its first `#` or `"`.
    let skip_raw = |mut i: usize, line: &mut usize| {
        let mut hashes = 0;
        while at(i) == '#' {
            hashes += 1;
            i += 1;
        }
        i += 1; // the opening quote
        while i < s.len() {
            if s[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                return i + 1 + hashes;
            }
            if s[i] == '\n' {
                *line += 1;
            }
            i += 1;
        }
        i
    };
    while i < s.len() {
        let c = s[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if s[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(i + 1, &mut line);
            out.push(Token {
                tok: Tok::Punct('"'),
                line,
            });
        } else if c == '\'' {
            // A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < s.len() && s[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Punct('\''),
                line,
            });
        } else if is_ident_start(c) {
            let start = i;
            while i < s.len() && is_ident_start(s[i]) {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let next = at(i);
            match (word.as_str(), next) {
                ("r" | "br" | "cr", '"') => i = skip_raw(i, &mut line),
                ("r" | "br" | "cr", '#') if matches!(at(i + 1), '#' | '"') => {
                    i = skip_raw(i, &mut line)
                }
                ("b" | "c", '"') => i = skip_string(i + 1, &mut line),
                ("b", '\'') => {
                    i += 1;
                    if at(i) == '\\' {
                        i += 1;
                    }
                    i += 1;
                    while i < s.len() && s[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                }
                // A raw identifier, `r#type`.
                ("r", '#') => {
                    let start = i + 1;
                    i = start;
                    while i < s.len() && is_ident_start(s[i]) {
                        i += 1;
                    }
                    out.push(Token {
                        tok: Tok::Ident(s[start..i].iter().collect()),
                        line,
                    });
                }
                _ => out.push(Token {
                    tok: Tok::Ident(word),
                    line,
                }),
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::PathSep,
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(c),
                line,
            });
            i += 1;
        }
    }
    out
}

fn ident(t: Option<&Token>) -> Option<&str> {
    match t.map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn punct(t: Option<&Token>, c: char) -> bool {
    t.is_some_and(|t| t.tok == Tok::Punct(c))
}

/// The index just past the balanced group that opens at `i` (`open`).
fn skip_group(toks: &[Token], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    while i < toks.len() {
        if punct(toks.get(i), open) {
            depth += 1;
        } else if punct(toks.get(i), close) {
            depth -= 1;
            if depth == 0 {
                return i + 1;
            }
        }
        i += 1;
    }
    i
}

/// Whether the attribute at `i` (`#`) is `#[cfg(test)]` or `#![cfg(test)]`,
/// and where it ends.
fn attribute(toks: &[Token], i: usize) -> Option<(bool, usize)> {
    let inner = punct(toks.get(i + 1), '!');
    let open = if inner { i + 2 } else { i + 1 };
    if !punct(toks.get(open), '[') {
        return None;
    }
    let end = skip_group(toks, open, '[', ']');
    let body: Vec<&Tok> = toks[open + 1..end - 1].iter().map(|t| &t.tok).collect();
    let cfg_test = body
        == [
            &Tok::Ident("cfg".into()),
            &Tok::Punct('('),
            &Tok::Ident("test".into()),
            &Tok::Punct(')'),
        ];
    Some((cfg_test, end))
}

/// The index just past the item that starts at `i` (after its attributes):
/// through its `;`, or through its body's closing brace.
fn skip_item(toks: &[Token], mut i: usize) -> usize {
    while punct(toks.get(i), '#') {
        match attribute(toks, i) {
            Some((_, end)) => i = end,
            None => break,
        }
    }
    let mut depth = 0i32;
    while i < toks.len() {
        match &toks[i].tok {
            Tok::Punct('(' | '[') => depth += 1,
            Tok::Punct(')' | ']') => depth -= 1,
            Tok::Punct(';') if depth == 0 => return i + 1,
            Tok::Punct('{') if depth == 0 => return skip_group(toks, i, '{', '}'),
            _ => {}
        }
        i += 1;
    }
    i
}

/// The first segment of each path in the `{...}` group opening at `i`, and
/// the index past the group.
fn group_heads(toks: &[Token], i: usize) -> (Vec<(String, usize)>, usize) {
    let end = skip_group(toks, i, '{', '}');
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    for t in &toks[i + 1..end - 1] {
        match &t.tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => depth -= 1,
            Tok::Punct(',') if depth == 0 => expect_head = true,
            Tok::Ident(s) if depth == 0 && expect_head => {
                heads.push((s.clone(), t.line));
                expect_head = false;
            }
            _ if depth == 0 => expect_head = false,
            _ => {}
        }
    }
    (heads, end)
}

/// Where a file's own module sits below the crate root: `src/rest/mod.rs`
/// is one level down, `src/rest/webhooks/stripe.rs` three.
fn module_depth(rel: &Path) -> usize {
    let parts = rel.components().count();
    if rel.file_name().is_some_and(|n| n == "mod.rs") {
        parts - 1
    } else {
        parts
    }
}

/// The top-level modules a file refers to, each with the line of its first
/// mention.
fn references(rel: &Path, src: &str) -> Vec<(String, usize)> {
    let toks = lex(src);
    let depth = module_depth(rel);
    let mut refs = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if punct(toks.get(i), '#')
            && let Some((cfg_test, end)) = attribute(&toks, i)
        {
            if cfg_test {
                if punct(toks.get(i + 1), '!') {
                    // The whole file is test code.
                    return Vec::new();
                }
                i = skip_item(&toks, end);
            } else {
                i = end;
            }
            continue;
        }
        let word = ident(toks.get(i));
        // `foo::crate` cannot occur, so `crate` here always starts a path.
        let climbs = match word {
            Some("crate") => Some(1),
            Some("super") => {
                let mut n = 0;
                let mut j = i;
                while ident(toks.get(j)) == Some("super")
                    && toks.get(j + 1).is_some_and(|t| t.tok == Tok::PathSep)
                {
                    n += 1;
                    j += 2;
                }
                // Reaches the crate root only when it climbs every level.
                (n > 0 && n >= depth && (i == 0 || toks[i - 1].tok != Tok::PathSep))
                    .then(|| 2 * n - 1)
            }
            _ => None,
        };
        let Some(consumed) = climbs else {
            i += 1;
            continue;
        };
        // `consumed` tokens lead up to the final `::`.
        let sep = i + consumed;
        if toks.get(sep).is_none_or(|t| t.tok != Tok::PathSep) {
            i += 1;
            continue;
        }
        let next = sep + 1;
        if punct(toks.get(next), '{') {
            let (heads, end) = group_heads(&toks, next);
            refs.extend(heads.into_iter().filter(|(h, _)| h != "self"));
            i = end;
        } else {
            if let Some(name) = ident(toks.get(next)) {
                refs.push((name.to_string(), toks[next].line));
            }
            i = next + 1;
        }
    }
    refs
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules `lib.rs` declares.
fn declared_modules(src: &Path) -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let toks = lex(&lib);
    (0..toks.len())
        .filter(|&i| ident(toks.get(i)) == Some("mod"))
        .filter_map(|i| ident(toks.get(i + 1)).map(str::to_string))
        .collect()
}

type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// Module -> its dependencies, each with where it is first seen.
fn module_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = declared_modules(&src);
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeMap::new()))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut unknown = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().to_path_buf();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        // `lib.rs` is the root, and `main.rs` is the binary, a crate of its own.
        if module == "lib" || module == "main" {
            continue;
        }
        assert!(
            modules.contains(&module),
            "{} is not under a module lib.rs declares",
            rel.display()
        );
        let text = std::fs::read_to_string(&file).unwrap();
        for (dep, line) in references(&rel, &text) {
            if !modules.contains(&dep) {
                unknown.push(format!("{}:{line}: crate::{dep}", rel.display()));
                continue;
            }
            if dep != module {
                graph
                    .get_mut(&module)
                    .unwrap()
                    .entry(dep)
                    .or_insert_with(|| format!("{}:{line}", rel.display()));
            }
        }
    }
    // lib.rs declares modules and nothing else, so anything else is a
    // misreading of the source, which would make this test vouch for nothing.
    assert!(
        unknown.is_empty(),
        "paths from the crate root that name no module:\n{}",
        unknown.join("\n")
    );
    graph
}

fn render(graph: &Graph) -> String {
    let mut out = String::new();
    for (module, deps) in graph {
        let deps: Vec<&str> = deps.keys().map(String::as_str).collect();
        writeln!(out, "{module} -> {}", deps.join(", ")).unwrap();
    }
    out
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'g>(st: &mut State<'g>, v: &'g str) {
        let n = st.index.len();
        st.index.insert(v, n);
        st.low.insert(v, n);
        st.stack.push(v);
        for w in st.graph[v].keys() {
            let w = w.as_str();
            if !st.index.contains_key(w) {
                visit(st, w);
                let lw = st.low[w];
                let lv = st.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if st.stack.contains(&w) {
                let iw = st.index[w];
                let lv = st.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if st.low[v] == st.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = st.stack.pop() {
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                st.found.push(comp);
            }
        }
    }
    let mut st = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !st.index.contains_key(v.as_str()) {
            visit(&mut st, v);
        }
    }
    st.found
}

/// One concrete cycle through `start` inside `component`, as a path that
/// ends where it began, each edge with the place it comes from.
fn cycle_through(graph: &Graph, component: &[String], start: &str) -> String {
    let inside: BTreeSet<&str> = component.iter().map(String::as_str).collect();
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut last = None;
    'search: while let Some(v) = queue.pop_front() {
        for w in graph[v].keys().map(String::as_str) {
            if w == start {
                last = Some(v);
                break 'search;
            }
            if inside.contains(w) && !prev.contains_key(w) {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    let mut path = vec![start];
    let mut v = last.expect("a strongly connected component has a cycle");
    while v != start {
        path.push(v);
        v = prev[v];
    }
    path.push(start);
    path.reverse();
    path.windows(2)
        .map(|e| format!("  {} -> {}   ({})", e[0], e[1], graph[e[0]][e[1]]))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn top_level_modules_have_no_cycles() {
    let graph = module_graph();
    println!("{}", render(&graph));
    let found = cycles(&graph);
    let report: Vec<String> = found
        .iter()
        .map(|c| {
            let inside: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    graph[a]
                        .iter()
                        .filter(|(b, _)| c.contains(b))
                        .map(move |(b, at)| format!("  {a} -> {b}   ({at})"))
                })
                .collect();
            format!(
                "modules {{{}}} depend on each other, e.g.:\n{}\nevery edge among them:\n{}",
                c.join(", "),
                cycle_through(&graph, c, &c[0]),
                inside.join("\n")
            )
        })
        .collect();
    assert!(
        found.is_empty(),
        "import cycles between top-level modules:\n{}\n\nthe graph:\n{}",
        report.join("\n"),
        render(&graph)
    );
}

#[test]
fn domain_depends_on_no_other_module_and_no_framework() {
    let graph = module_graph();
    assert!(
        graph["domain"].is_empty(),
        "domain/ holds pure rules, yet depends on: {:?}",
        graph["domain"]
    );
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let toks = lex(&text);
        for (t, next) in toks.iter().zip(toks.iter().skip(1)) {
            if let Tok::Ident(w) = &t.tok
                && next.tok == Tok::PathSep
                && matches!(
                    w.as_str(),
                    "axum" | "async_graphql" | "sea_orm" | "entities" | "tokio" | "reqwest"
                )
            {
                found.push(format!("{}:{}: {w}", file.display(), t.line));
            }
        }
    }
    assert!(
        found.is_empty(),
        "domain/ uses I/O or framework crates:\n{}",
        found.join("\n")
    );
}

/// Storage sits behind `db/` (DESIGN §2): no other module builds a query.
/// Entity rows may travel as plain data, but naming SeaORM, an entity's
/// `Entity`, `ActiveModel` or `Column` outside `db/` is a query built
/// somewhere it should not be. `error.rs` maps the database's error into the
/// one error type, which is its job.
#[test]
fn only_db_builds_queries() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut found = Vec::new();
    let mut scanned = 0;
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        if rel.starts_with("db") || rel == Path::new("error.rs") {
            continue;
        }
        scanned += 1;
        let text = std::fs::read_to_string(&file).unwrap();
        found.extend(
            query_builder_uses(&text)
                .into_iter()
                .map(|(line, what)| format!("src/{}:{line}: {what}", rel.display())),
        );
    }
    assert!(scanned > 20, "only {scanned} files outside db/ were read");
    assert!(
        found.is_empty(),
        "queries built outside db/ (add a repository function there):\n{}",
        found.join("\n")
    );
}

/// Where a source names SeaORM or an entity's query-building types.
fn query_builder_uses(src: &str) -> Vec<(usize, String)> {
    let toks = lex(src);
    let mut out = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        match ident(Some(t)) {
            Some("sea_orm") => out.push((t.line, "sea_orm".to_string())),
            Some("entities")
                if toks.get(i + 1).is_some_and(|t| t.tok == Tok::PathSep)
                    && toks.get(i + 3).is_some_and(|t| t.tok == Tok::PathSep) =>
            {
                let table = ident(toks.get(i + 2)).unwrap_or("?");
                let mut names = vec![ident(toks.get(i + 4))];
                // `entities::purchases::{Column, Entity}`
                if punct(toks.get(i + 4), '{') {
                    let end = skip_group(&toks, i + 4, '{', '}');
                    names = toks[i + 5..end].iter().map(|t| ident(Some(t))).collect();
                }
                for name in names.into_iter().flatten() {
                    if matches!(name, "Entity" | "ActiveModel" | "Column" | "Relation") {
                        out.push((t.line, format!("entities::{table}::{name}")));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn the_query_guard_sees_sea_orm_and_entity_queries() {
    let code = r#"
use sea_orm::EntityTrait;
use entities::purchases::{self, Column, Model};
fn f() { entities::customers::Entity::find(); }
fn g(m: entities::purchases::Model) -> &'static str { "sea_orm::x" }
// sea_orm::Comment
"#;
    let found: Vec<String> = query_builder_uses(code)
        .into_iter()
        .map(|(l, w)| format!("{l}:{w}"))
        .collect();
    assert_eq!(
        found,
        [
            "2:sea_orm",
            "3:entities::purchases::Column",
            "4:entities::customers::Entity"
        ]
    );
}

/// The reader sees what it must, or its passing would mean nothing.
#[test]
fn the_reader_finds_paths_in_every_form_and_skips_test_code() {
    let code = r##"
        use crate::{app::AppState, auth::{self, Principal}, db};
        use super::super::jobs;
        // crate::commented
        /* crate::block /* nested crate::inner */ */
        fn f() { let _ = crate::events::outbound::sign; let s = "crate::quoted"; let r = r#"crate::raw"#; let c = '"'; let l: &'static str = "x"; crate::clock::now(); }
        #[cfg(test)]
        mod tests { use crate::graphql; }
        #[cfg(test)]
        use crate::rest;
        #[derive(Debug)]
        struct S { m: crate::metrics::Metrics }
    "##;
    let refs: BTreeSet<String> = references(Path::new("a/b.rs"), code)
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    let expected: BTreeSet<String> = ["app", "auth", "db", "jobs", "events", "clock", "metrics"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(refs, expected);
    // One level short of the root stays inside the module.
    assert!(references(Path::new("a/b/c.rs"), "use super::super::x;").is_empty());
    assert_eq!(
        references(Path::new("a/mod.rs"), "use super::x;")[0].0,
        "x".to_string()
    );
}
