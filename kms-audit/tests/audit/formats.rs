//! Export formats: JSON Lines round trip and error reporting, CSV layout and escaping,
//! interleaving events with checkpoints.

use std::collections::BTreeMap;

use kms_audit::{
    interleave, read_jsonl, write_csv, write_jsonl, AuditError, Chain, EventFields, ExportRecord,
    CSV_COLUMNS,
};

use crate::fixture::{build, check, fixture, records};

#[test]
fn jsonl_round_trip_preserves_everything_and_still_verifies() {
    let rs = records();
    let mut buf = Vec::new();
    write_jsonl(&mut buf, &rs).unwrap();
    let text = String::from_utf8(buf.clone()).unwrap();
    assert_eq!(text.lines().count(), 2503);
    assert!(text.starts_with("{\"type\":\"event\",\"seq\":1,\"time_ms\":"));
    let cp_line = text.lines().nth(1000).unwrap();
    assert!(
        cp_line.starts_with("{\"type\":\"checkpoint\",\"node_id\":"),
        "{cp_line}"
    );
    let back = read_jsonl(buf.as_slice()).unwrap();
    assert_eq!(back, rs);
    assert!(check(&back).ok);
}

#[test]
fn jsonl_field_names_are_stable() {
    let rs = build(&fixture().signer, 1, 1);
    let mut buf = Vec::new();
    write_jsonl(&mut buf, &rs).unwrap();
    let text = String::from_utf8(buf).unwrap();
    let mut lines = text.lines();
    let event: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let keys: Vec<&str> = event
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = vec![
        "type",
        "seq",
        "time_ms",
        "node_id",
        "request_id",
        "caller",
        "caller_fingerprint",
        "role",
        "operation",
        "key_id",
        "key_version",
        "context",
        "acting_user",
        "purpose",
        "outcome",
        "latency_us",
        "detail",
        "prev_hash",
        "hash",
    ];
    let mut keys_sorted = keys.clone();
    keys_sorted.sort_unstable();
    expected.sort_unstable();
    assert_eq!(keys_sorted, expected);
    let cp: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let mut keys: Vec<&str> = cp.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "head_hash",
            "node_id",
            "public_key_fingerprint",
            "seq",
            "signature",
            "time_ms",
            "type"
        ]
    );
}

#[test]
fn jsonl_errors_name_the_line() {
    let rs = build(&fixture().signer, 3, 3);
    let mut buf = Vec::new();
    write_jsonl(&mut buf, &rs).unwrap();
    let mut text = String::from_utf8(buf).unwrap();
    text.push('\n'); // blank lines are skipped
    text.push_str("{\"type\":\"event\",\"seq\":\"oops\"}\n");
    match read_jsonl(text.as_bytes()) {
        Err(AuditError::Json { line, .. }) => assert_eq!(line, 6),
        other => panic!("expected a JSON error on line 6, got {other:?}"),
    }

    // A field outside the hash must not ride along.
    let line = serde_json::to_string(&rs[0]).unwrap();
    let smuggled = line.replacen('{', "{\"note\":\"hi\",", 1);
    let err = read_jsonl(format!("{line}\n{smuggled}\n").as_bytes()).unwrap_err();
    assert!(
        err.to_string().starts_with("line 2: unknown field `note`"),
        "{err}"
    );

    let err = read_jsonl(&b"{\"type\":\"nonsense\"}"[..]).unwrap_err();
    assert!(err.to_string().starts_with("line 1:"), "{err}");
}

#[test]
fn csv_has_a_header_and_escapes_cells() {
    let mut context = BTreeMap::new();
    context.insert("note;id".to_owned(), "a=b".to_owned());
    context.insert("patient".to_owned(), "p\\1".to_owned());
    let mut chain = Chain::genesis("node,1");
    let e = chain
        .append(EventFields {
            time_ms: 1_700_000_000_123,
            caller: "CN=\"Dr, Ames\"".to_owned(),
            operation: "Decrypt".to_owned(),
            context,
            outcome: "OK".to_owned(),
            detail: "=1+1\nsecond line".to_owned(),
            key_version: Some(2),
            ..EventFields::default()
        })
        .unwrap();
    let mut buf = Vec::new();
    write_csv(&mut buf, [&e]).unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (header, row) = text.split_once("\r\n").unwrap();
    assert_eq!(header, CSV_COLUMNS.join(","));
    let expected = format!(
        "1,1700000000123,2023-11-14T22:13:20.123Z,\"node,1\",,\"CN=\"\"Dr, Ames\"\"\",,,Decrypt,,2,\
         note\\;id=a\\=b;patient=p\\\\1,,,OK,0,\"'=1+1\nsecond line\",{},{}\r\n",
        e.prev_hash, e.hash
    );
    assert_eq!(row, expected);

    // Only events are written; checkpoints are skipped by the caller.
    let rs = build(&fixture().signer, 5, 2);
    let mut buf = Vec::new();
    write_csv(&mut buf, rs.iter().filter_map(ExportRecord::as_event)).unwrap();
    assert_eq!(String::from_utf8(buf).unwrap().matches("\r\n").count(), 6);
}

#[test]
fn interleave_places_checkpoints_after_their_events() {
    let rs = records();
    let events: Vec<_> = rs
        .iter()
        .filter_map(|r| r.as_event().cloned())
        .rev()
        .collect();
    let checkpoints: Vec<_> = rs
        .iter()
        .filter_map(|r| r.as_checkpoint().cloned())
        .collect();
    assert_eq!(interleave(events.clone(), checkpoints.clone()), rs);

    // A range export keeps only the checkpoints that fall inside it.
    let range: Vec<_> = events
        .into_iter()
        .filter(|e| (1001..=2100).contains(&e.seq))
        .collect();
    let out = interleave(range, checkpoints);
    assert_eq!(
        out.iter().filter(|r| r.as_checkpoint().is_some()).count(),
        1
    );
    let report = check(&out);
    assert!(report.ok, "{report}");
    assert_eq!(report.covered_through_seq, Some(2000));
    assert_eq!(report.uncovered_tail, 100);
}
