"""The SpeechLM model: config, Whisper encoder, projectors, speech vocabulary, training modes."""
