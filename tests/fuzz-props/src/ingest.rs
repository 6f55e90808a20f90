//! The cloud's answer to a push `{results:[{seq, id?, status, reason?}]}`: the cursor
//! may only move (Ok) when every event of the batch was answered for, and only the
//! events the cloud said it rejected are set aside.

use std::collections::HashMap;

use pos_hub::bridge::push::judge_answer;

pub fn run(data: &[u8]) {
    // The batch: seqs 1..=n, n from the first byte.
    let Some((&n, body)) = data.split_first() else {
        return;
    };
    let seqs: Vec<u64> = (1..=(n as u64 % 8) + 1).collect();
    match judge_answer(&seqs, body) {
        Ok(rejected) => {
            let Some(v) = crate::util::accepted_json(body, "answer") else {
                return;
            };
            let mut status: HashMap<u64, Vec<String>> = HashMap::new();
            for r in v["results"].as_array().expect("results") {
                if let Some(seq) = r["seq"].as_u64() {
                    status
                        .entry(seq)
                        .or_default()
                        .push(r["status"].as_str().unwrap_or("").to_string());
                }
            }
            for s in &seqs {
                let st = status.get(s).unwrap_or_else(|| {
                    panic!("seq {s} of the batch was never answered, yet the cursor moves: {v}")
                });
                assert!(st
                    .iter()
                    .all(|x| ["accepted", "duplicate", "rejected"].contains(&x.as_str())));
            }
            for (seq, _, reason) in &rejected {
                assert!(seqs.contains(seq));
                assert!(status[seq].iter().any(|x| x == "rejected"));
                assert!(!reason.is_empty());
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
}
