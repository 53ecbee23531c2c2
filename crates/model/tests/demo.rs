//! The demo model through the engine's own generation loop, prompt encoding and tokenizer, against what HF
//! transformers answered on the same quantized weights (`heldout.jsonl`, `eval.json` from tools/fixtures).

mod common;

use common::*;
use pipemoe_model::chat::{ChatFormat, ChatOptions, Message};
use pipemoe_model::tokenizer::Tokenizer;
use pipemoe_model::{GenerateOptions, Generator};

#[derive(serde::Deserialize)]
struct Heldout {
    question: String,
    answer: String,
    prompt: String,
    transformers_answer: Option<String>,
}

#[test]
fn held_out_answers_equal_transformers_answers() {
    let dir = models_dir().join("tiny-dsv32-w3a16");
    let heldout: Vec<Heldout> = std::fs::read_to_string(dir.join("heldout.jsonl"))
        .expect("heldout.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("heldout line"))
        .collect();
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).expect("eval.json")).expect("json");
    assert!(heldout.len() >= 200);

    let tokenizer = Tokenizer::from_dir(&dir).expect("tokenizer");
    let format = ChatFormat::for_model("deepseek_v32", &tokenizer).expect("chat format");
    let mut prompts = Vec::new();
    for h in &heldout {
        let text = format.render(&[Message::user(h.question.clone())], &ChatOptions::default()).expect("render");
        assert_eq!(text, h.prompt, "our DeepSeek-V3.2 encoding differs from the generator's");
        prompts.push(tokenizer.encode(&text).expect("encode"));
    }

    let mut generator = Generator::new(full_model(&dir), tokenizer).expect("generator");
    // The generator's answers: 12 greedy tokens, an answer counts only when it ends with EOS.
    let opts = GenerateOptions { max_tokens: 12, ..GenerateOptions::default() };
    let mut correct = 0;
    for (chunk, hs) in prompts.chunks(35).zip(heldout.chunks(35)) {
        let outs = generator.generate_batch(chunk, &vec![opts.clone(); chunk.len()]).expect("generate");
        for (out, h) in outs.iter().zip(hs) {
            let ended = out.token_ids.last().is_some_and(|&t| generator.tokenizer.is_eos(t));
            let ours = ended.then(|| {
                let ids = &out.token_ids[..out.token_ids.len() - 1];
                generator.tokenizer.decode(ids, false).expect("decode")
            });
            assert_eq!(ours, h.transformers_answer, "{:?}", h.question);
            correct += usize::from(ours.as_deref() == Some(h.answer.as_str()));
        }
    }
    let accuracy = correct as f64 / heldout.len() as f64;
    assert_eq!(accuracy, eval["quantized_accuracy"].as_f64().expect("quantized_accuracy"));
    assert!(accuracy >= 0.9);
}
