//! Chat templates: rendered with minijinja as transformers renders them.

use super::*;

impl Tokenizer {
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the model's chat template, as transformers'
    /// `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)` does.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let source = self.chat_template.as_deref().ok_or(TokenizerError::NoChatTemplate)?;
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.set_unknown_method_callback(python_string_methods);
        let template = env.template_from_str(source).map_err(|e| TokenizerError::Template(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => messages,
            bos_token => self.bos.as_ref().map(|(s, _)| s.as_str()).unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
            add_generation_prompt => true,
        };
        template.render(ctx).map_err(|e| TokenizerError::Template(e.to_string()))
    }
}

/// The Python `str` methods chat templates call (`message.content.strip()` and the like).
fn python_string_methods(
    _state: &minijinja::State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> Result<minijinja::Value, minijinja::Error> {
    use minijinja::{Error, ErrorKind, Value as V};
    let s = value.as_str().ok_or_else(|| Error::from(ErrorKind::UnknownMethod))?;
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str());
    let chars = |i: usize| arg(i).map(|c| c.chars().collect::<Vec<_>>());
    Ok(match method {
        "strip" => V::from(match chars(0) {
            Some(cs) => s.trim_matches(cs.as_slice()),
            None => s.trim(),
        }),
        "lstrip" => V::from(match chars(0) {
            Some(cs) => s.trim_start_matches(cs.as_slice()),
            None => s.trim_start(),
        }),
        "rstrip" => V::from(match chars(0) {
            Some(cs) => s.trim_end_matches(cs.as_slice()),
            None => s.trim_end(),
        }),
        "startswith" => V::from(arg(0).is_some_and(|p| s.starts_with(p))),
        "endswith" => V::from(arg(0).is_some_and(|p| s.ends_with(p))),
        "upper" => V::from(s.to_uppercase()),
        "lower" => V::from(s.to_lowercase()),
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}
