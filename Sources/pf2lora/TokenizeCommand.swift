import ArgumentParser
import Foundation
import PF2LoRA

/// `pf2lora tokenize`: text on stdin -> token ids as a JSON array, or back with --decode.
struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Encode UTF-8 text from stdin to token ids (a JSON array), or decode ids back to text.",
        discussion: """
            Encoding reads all of stdin as UTF-8 and prints the ids as one JSON array, e.g. [15496, 995]. \
            Added tokens written in the text, such as <|endoftext|>, become their ids. The tokenizer's \
            post-processor adds its special tokens as Hugging Face does by default (Llama-3: \
            <|begin_of_text|> in front; GPT-2 and Qwen2: none); --no-special-tokens leaves them out.

            With --decode, stdin must hold a JSON array of integer ids; the text is printed exactly, with \
            no newline added (bytes that do not form valid UTF-8 print as U+FFFD). Special tokens are \
            printed too unless --skip-special-tokens.

            --model may be a model folder or a tokenizer-only folder: it needs tokenizer.json (byte-level \
            BPE: GPT-2, Llama-3, Qwen2, SmolLM2 families), or vocab.json and merges.txt (the Hugging Face \
            GPT-2 layout).

            With --messages, stdin holds a JSON array of chat messages ([{"role": "user", "content": "Hi"}]); \
            they are rendered with the folder's chat template (tokenizer_config.json's chat_template or \
            chat_template.jinja, exactly as transformers' apply_chat_template; models without one get the \
            plain "Role: content" format of docs/CHAT.md) with the assistant generation prompt unless \
            --no-generation-prompt, then encoded without adding special tokens (the template writes them). \
            --print-prompt prints the rendered text instead of the ids.

            Invalid UTF-8 input, a bad JSON array or an unknown id prints one error line on stderr and \
            exits with status 1.

            Examples:
              printf 'Hello world' | pf2lora tokenize --model DIR
              echo '[15496, 995]' | pf2lora tokenize --model DIR --decode
              echo '[{"role": "user", "content": "Hi"}]' | pf2lora tokenize --model DIR --messages --print-prompt
            """)

    @Option(help: ArgumentHelp("Model or tokenizer folder (tokenizer.json, or vocab.json + merges.txt).", valueName: "DIR"))
    var model: String

    @Flag(help: "Read a JSON array of token ids from stdin and print their text.")
    var decode = false

    @Flag(help: "Encode without the post-processor's special tokens (e.g. Llama-3's <|begin_of_text|>).")
    var noSpecialTokens = false

    @Flag(help: "With --decode, leave special tokens (<|eot_id|>, <|im_end|> ...) out of the text.")
    var skipSpecialTokens = false

    @Flag(help: "Read a JSON array of chat messages and render them with the model's chat template first.")
    var messages = false

    @Flag(help: "With --messages, do not append the assistant generation prompt.")
    var noGenerationPrompt = false

    @Flag(help: "With --messages, print the rendered prompt text instead of its token ids.")
    var printPrompt = false

    func run() throws {
        let tokenizer = try BPETokenizer(folder: model)
        let input = FileHandle.standardInput.readDataToEndOfFile()
        if decode {
            let ids = try parseIds(input, vocabSize: tokenizer.vocabSize)
            FileHandle.standardOutput.write(Data(tokenizer.decodeBytes(ids, skipSpecialTokens: skipSpecialTokens)))
        } else {
            guard var text = String(validating: input, as: UTF8.self) else {
                throw CLIError("stdin is not valid UTF-8 (first invalid byte at offset \(firstInvalidUTF8Offset(input))); tokenize takes UTF-8 text")
            }
            var addSpecial = !noSpecialTokens
            if messages {
                text = try ChatTemplate(folder: model).render(messagesJSON: text, addGenerationPrompt: !noGenerationPrompt)
                if printPrompt {
                    FileHandle.standardOutput.write(Data(text.utf8))
                    return
                }
                addSpecial = false
            }
            let ids = tokenizer.encode(text, addSpecialTokens: addSpecial)
            var out = "["
            out.reserveCapacity(ids.count * 7 + 2)
            for (k, id) in ids.enumerated() {
                if k > 0 { out += ", " }
                out += String(id)
            }
            out += "]\n"
            FileHandle.standardOutput.write(Data(out.utf8))
        }
    }

    /// Parses a JSON array of integers, e.g. `[15496, 995]`, checking each id against the vocabulary.
    private func parseIds(_ data: Data, vocabSize: Int) throws -> [Int] {
        let bytes = [UInt8](data)
        var i = 0
        func skipSpace() { while i < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[i]) { i += 1 } }
        let notArray = "stdin is not a JSON array of token ids; --decode expects e.g. [15496, 995]"
        skipSpace()
        guard i < bytes.count, bytes[i] == UInt8(ascii: "[") else { throw CLIError(notArray) }
        i += 1
        var ids: [Int] = []
        skipSpace()
        if i < bytes.count, bytes[i] == UInt8(ascii: "]") {
            i += 1
        } else {
            while true {
                skipSpace()
                let start = i
                if i < bytes.count, bytes[i] == UInt8(ascii: "-") { i += 1 }
                while i < bytes.count, bytes[i] >= 0x30, bytes[i] <= 0x39 { i += 1 }
                // anything else that is JSON (1.5, 1e3, "a", true) is not a token id
                var end = i
                while end < bytes.count, ![UInt8(ascii: ","), UInt8(ascii: "]")].contains(bytes[end]) { end += 1 }
                let token = String(decoding: bytes[start..<end], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                guard let id = Int(token) else {
                    throw CLIError("element \(ids.count) of the JSON array is '\(token.prefix(40))', not an integer token id")
                }
                guard id >= 0 && id < vocabSize else {
                    throw CLIError("token id \(id) (element \(ids.count)) is outside the vocabulary of \(model) (0..<\(vocabSize))")
                }
                ids.append(id)
                i = end
                guard i < bytes.count else { throw CLIError(notArray + " (the array is not closed)") }
                i += 1
                if bytes[i - 1] == UInt8(ascii: "]") { break }
            }
        }
        skipSpace()
        guard i == bytes.count else { throw CLIError(notArray + " (extra text after the array)") }
        return ids
    }
}

/// Byte offset of the first byte that breaks UTF-8 validity.
private func firstInvalidUTF8Offset(_ data: Data) -> Int {
    var parser = Unicode.UTF8.ForwardParser()
    var bytes = data.makeIterator()
    var offset = 0
    while true {
        switch parser.parseScalar(from: &bytes) {
        case .valid(let s): offset += s.count
        case .error, .emptyInput: return offset
        }
    }
}
