//! nanoclaw's seccomp profile as a profile Docker applies the same way.
//!
//! nanoclaw's `default.json` is in Docker's format, but nanoclaw's compiler
//! tries a syscall's rules top to bottom ("allow `clone` without namespace
//! flags, then refuse `clone`"), while Docker (libseccomp) drops a rule
//! whose action is the default one (here: allow) and would refuse every
//! `clone`. So each "conditional allow, then refuse" pair is rewritten as
//! refusals of exactly the other cases:
//!
//! * allowed when `arg & MASK == 0` → one refusal per bit of MASK
//!   (`arg & BIT == BIT`);
//! * allowed when `arg` is one of a few small values → a refusal for every
//!   other value up to the largest, and for everything above it;
//! * allowed when `argI == 0` or `argJ == 0` → one refusal with
//!   `argI != 0` and `argJ != 0`.
//!
//! A pair of another shape cannot be said in Docker's default-allow form;
//! it is left unrestricted and named (in `layers.degraded`).

use serde_json::{json, Value};

/// The profile for Docker, and what could not be carried over.
pub fn for_docker(profile: &str) -> Result<(Value, Vec<String>), String> {
    let mut v: Value = serde_json::from_str(profile).map_err(|e| e.to_string())?;
    let m = v.as_object_mut().ok_or("not a JSON object")?;
    // nanoclaw's own extension (ENOSYS beyond its syscall table) has no
    // Docker equivalent; Docker keeps its default action.
    m.remove("nanoclaw");
    m.remove("comment");
    if m.get("defaultAction").and_then(Value::as_str) != Some("SCMP_ACT_ALLOW") {
        return Ok((v, Vec::new()));
    }
    let rules: Vec<Value> = m
        .get("syscalls")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // Per syscall name: its rules, in order.
    let mut names: Vec<String> = Vec::new();
    for r in &rules {
        for n in r["names"].as_array().into_iter().flatten() {
            if let Some(n) = n.as_str() {
                if !names.iter().any(|x| x == n) {
                    names.push(n.to_string());
                }
            }
        }
    }
    let mut out: Vec<Value> = Vec::new();
    let mut lost = Vec::new();
    for name in &names {
        let mine: Vec<&Value> = rules
            .iter()
            .filter(|r| {
                r["names"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|n| n == name.as_str()))
            })
            .collect();
        let allows: Vec<&Value> = mine
            .iter()
            .copied()
            .filter(|r| r["action"] == "SCMP_ACT_ALLOW")
            .collect();
        let refusal = mine
            .iter()
            .copied()
            .find(|r| r["action"] != "SCMP_ACT_ALLOW" && r.get("args").is_none());
        let others = mine
            .iter()
            .copied()
            .filter(|r| r["action"] != "SCMP_ACT_ALLOW" && r.get("args").is_some());
        for r in others {
            out.push(only(r, name, r["args"].clone()));
        }
        match (allows.is_empty(), refusal) {
            (true, Some(r)) => out.push(only(r, name, Value::Null)),
            (true, None) => {}
            (false, None) => {}
            (false, Some(r)) => match rewrite(&allows) {
                Some(arg_sets) => {
                    for args in arg_sets {
                        out.push(only(r, name, args));
                    }
                }
                None => lost.push(format!(
                    "seccomp: the argument rules of {name} cannot be expressed in Docker's format; {name} is not restricted"
                )),
            },
        }
    }
    m.insert("syscalls".into(), Value::Array(out));
    Ok((v, lost))
}

/// Rule `r` for syscall `name` alone, with `args` (none when null).
fn only(r: &Value, name: &str, args: Value) -> Value {
    let mut o = json!({ "names": [name], "action": r["action"] });
    if let Some(e) = r.get("errnoRet") {
        o["errnoRet"] = e.clone();
    }
    if !args.is_null() {
        o["args"] = args;
    }
    o
}

fn arg(index: u64, value: u64, two: u64, op: &str) -> Value {
    json!({ "index": index, "value": value, "valueTwo": two, "op": op })
}

/// The refusals (one argument list each) that mean "not allowed by any of
/// `allows`", or `None` for a shape this cannot say.
fn rewrite(allows: &[&Value]) -> Option<Vec<Value>> {
    let conds: Vec<&Value> = allows
        .iter()
        .map(|r| match r["args"].as_array().map(Vec::as_slice) {
            Some([one]) => Some(one),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let get = |c: &Value| -> Option<(u64, u64, u64, String)> {
        Some((
            c["index"].as_u64()?,
            c["value"].as_u64()?,
            c.get("valueTwo").and_then(Value::as_u64).unwrap_or(0),
            c["op"].as_str()?.to_string(),
        ))
    };
    let conds: Vec<(u64, u64, u64, String)> = conds.into_iter().map(get).collect::<Option<_>>()?;
    let (index, _, _, _) = conds[0].clone();
    let same_index = conds.iter().all(|c| c.0 == index);
    // arg & MASK == 0: refuse each bit of MASK.
    if let [(i, mask, 0, op)] = conds.as_slice() {
        if op == "SCMP_CMP_MASKED_EQ" {
            return Some(
                (0..64)
                    .map(|b| 1u64 << b)
                    .filter(|bit| mask & bit != 0)
                    .map(|bit| json!([arg(*i, bit, bit, "SCMP_CMP_MASKED_EQ")]))
                    .collect(),
            );
        }
    }
    if conds.iter().all(|c| c.3 == "SCMP_CMP_EQ") {
        if same_index {
            // arg in a small set: refuse every other value.
            let allowed: Vec<u64> = conds.iter().map(|c| c.1).collect();
            let max = *allowed.iter().max()?;
            if max > 64 {
                return None;
            }
            let mut out: Vec<Value> = (0..max)
                .filter(|v| !allowed.contains(v))
                .map(|v| json!([arg(index, v, 0, "SCMP_CMP_EQ")]))
                .collect();
            out.push(json!([arg(index, max + 1, 0, "SCMP_CMP_GE")]));
            return Some(out);
        }
        // argI == 0 or argJ == 0 (distinct arguments): refuse when none is.
        let mut idx: Vec<u64> = conds.iter().map(|c| c.0).collect();
        idx.sort_unstable();
        idx.dedup();
        if idx.len() == conds.len() && conds.iter().all(|c| c.1 == 0) {
            return Some(vec![Value::Array(
                conds
                    .iter()
                    .map(|c| arg(c.0, 0, 0, "SCMP_CMP_NE"))
                    .collect(),
            )]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_for<'a>(v: &'a Value, name: &str) -> Vec<&'a Value> {
        v["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["names"][0] == name)
            .collect()
    }

    #[test]
    fn conditional_allows_become_refusals_of_the_other_cases() {
        let (v, lost) =
            for_docker(nanoclaw_sandbox::native::seccomp::DEFAULT_PROFILE_JSON).unwrap();
        assert!(v.get("nanoclaw").is_none());
        // clone: refused for each namespace flag, never unconditionally.
        let clone = rules_for(&v, "clone");
        assert_eq!(clone.len(), 7, "{clone:?}");
        assert!(clone
            .iter()
            .all(|r| r["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"));
        assert!(clone.iter().any(
            |r| r["args"][0]["value"] == 0x1000_0000 && r["args"][0]["valueTwo"] == 0x1000_0000
        ));
        // socket: AF_UNIX, AF_INET, AF_INET6, AF_NETLINK only.
        let socket = rules_for(&v, "socket");
        let refused: Vec<u64> = socket
            .iter()
            .filter(|r| r["args"][0]["op"] == "SCMP_CMP_EQ")
            .map(|r| r["args"][0]["value"].as_u64().unwrap())
            .collect();
        assert!(
            refused.contains(&0)
                && refused.contains(&15)
                && !refused.contains(&16)
                && !refused.contains(&2)
        );
        assert!(socket
            .iter()
            .any(|r| r["args"][0]["op"] == "SCMP_CMP_GE" && r["args"][0]["value"] == 17));
        // prlimit64 on another process with a new limit: refused.
        let p = rules_for(&v, "prlimit64");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0]["args"].as_array().unwrap().len(), 2);
        // Unconditional refusals stay; personality is the one loss.
        assert_eq!(rules_for(&v, "mount").len(), 1);
        assert!(rules_for(&v, "mount")[0].get("args").is_none());
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("personality"));
    }
}
