import Foundation
import Testing
@testable import PF2LoRA

/// Fixtures/chat/, written by Tests/FixtureScripts/fixtures/chat_templates.py: conversations rendered by jinja2 as
/// transformers 5.24 (jinja2 3.1.6) renders chat templates.
private struct ChatFixture {
    let conversations: [String: JinjaValue]
    let tools: [JinjaValue]
    let extras: [String: JinjaValue]
    let specialTokens: [String: [String: String]]
    let cases: [JinjaObject]
    let templates: [String: (String, [String: String])]

    static let shared: ChatFixture = {
        func load(_ name: String) -> JinjaValue {
            let text = try! String(contentsOfFile: TestPaths.fixture("chat/\(name)"), encoding: .utf8)
            return try! JinjaValue.parseJSON(text)
        }
        guard case .object(let root) = load("cases.json"), case .object(let templatesObject) = load("templates.json") else { fatalError("bad fixture") }
        func object(_ v: JinjaValue?) -> JinjaObject { if case .object(let o)? = v { return o }; return JinjaObject() }
        func strings(_ v: JinjaValue?) -> [String: String] {
            var d: [String: String] = [:]
            for (k, x) in object(v).pairs { if case .string(let s) = x { d[k] = s } }
            return d
        }
        var specials: [String: [String: String]] = [:]
        for (k, v) in object(root["special_tokens"]).pairs { specials[k] = strings(v) }
        var templates: [String: (String, [String: String])] = [:]
        for (name, t) in templatesObject.pairs {
            guard case .string(let src)? = object(t)["source"] else { continue }
            templates[name] = (src, strings(object(t)["special_tokens"]))
        }
        guard case .array(let tools)? = root["tools"], case .array(let cases)? = root["cases"] else { fatalError("bad fixture") }
        return ChatFixture(conversations: Dictionary(uniqueKeysWithValues: object(root["conversations"]).pairs),
                           tools: tools, extras: Dictionary(uniqueKeysWithValues: object(root["extras"]).pairs),
                           specialTokens: specials, cases: cases.map { object($0) }, templates: templates)
    }()
}

@Suite struct ChatTemplateTests {
    /// The text with the date `strftime_now` wrote (Llama 3.2 without date_string: "Today Date: 02 Dec
    /// 2026") replaced: jinja2 rendered the fixture on the day it was made, the interpreter renders
    /// today (`strftimeNowWritesToday` checks that date). The suite failed every day but that one.
    static func undated(_ s: String) -> String {
        s.replacingOccurrences(of: #"Today Date: [0-9]{2} [A-Z][a-z]{2} [0-9]{4}"#, with: "Today Date: (today)", options: .regularExpression)
    }

    /// Renders every case of `name` and compares with jinja2's text (or its error).
    private func check(_ name: String, _ template: ChatTemplate) throws {
        let f = ChatFixture.shared
        let cases = f.cases.filter { if case .string(name)? = $0["template"] { return true }; return false }
        #expect(!cases.isEmpty, "no fixture cases for \(name)")
        var failures = 0
        for c in cases {
            guard case .string(let conversation)? = c["conversation"], case .array(let items)? = f.conversations[conversation],
                  case .string(let extraName)? = c["extra"], case .object(let extra)? = f.extras[extraName] else {
                Issue.record("bad case \(c)"); continue
            }
            let messages = try items.map { try ChatMessage($0) }
            let agp = c["add_generation_prompt"]?.truthy ?? false
            let tools = c["tools"]?.truthy == true ? f.tools : nil
            let label = "\(name) / \(conversation) / agp=\(agp) / tools=\(tools != nil) / \(extraName)"
            let result: Result<String, Error> = Result {
                try template.render(messages: messages, addGenerationPrompt: agp, tools: tools,
                                    context: Dictionary(uniqueKeysWithValues: extra.pairs))
            }
            switch (result, c["text"], c["error"], c["message"]) {
            case (.success(let got), .string(let want)?, _, _):
                if Self.undated(got) != Self.undated(want) {
                    failures += 1
                    if failures <= 3 {
                        let diff = zip(Array(got.unicodeScalars), Array(want.unicodeScalars)).enumerated().first { $0.element.0 != $0.element.1 }?.offset
                            ?? min(got.unicodeScalars.count, want.unicodeScalars.count)
                        let a = String(String.UnicodeScalarView(Array(got.unicodeScalars).dropFirst(max(0, diff - 40)).prefix(100)))
                        let b = String(String.UnicodeScalarView(Array(want.unicodeScalars).dropFirst(max(0, diff - 40)).prefix(100)))
                        Issue.record("\(label): differs at scalar \(diff):\n  got  \(a.debugDescription)\n  want \(b.debugDescription)")
                    }
                }
            case (.failure(let e), .string?, _, _):
                failures += 1
                Issue.record("\(label): error \(e), jinja2 rendered it")
            case (.success(let got), nil, .string(let kind)?, _):
                failures += 1
                Issue.record("\(label): rendered \(got.prefix(80).debugDescription), jinja2 raised \(kind)")
            case (.failure(let e), nil, .string("raised")?, .string(let message)?):
                #expect(e as? ChatTemplateError == .raised(message), "\(label): \(e)")
            case (.failure(let e), nil, .string?, _):
                guard case .render? = e as? ChatTemplateError else { Issue.record("\(label): \(e) is not a render error"); break }
            default:
                Issue.record("\(label): unexpected case shape")
            }
        }
        #expect(failures == 0, "\(name): \(failures) of \(cases.count) cases differ")
    }

    @Test(arguments: ["chatml", "mistral", "gemma", "phi3", "zephyr", "llama2", "tools", "stress", "whitespace"])
    func writtenTemplatesMatchJinja2(name: String) throws {
        let (source, specials) = try #require(ChatFixture.shared.templates[name])
        try check(name, try ChatTemplate(source: source, specialTokens: specials))
    }

    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func llama32TemplateMatchesTransformers() throws {
        let template = try ChatTemplate(folder: SharedTokenizers.llama3Dir)
        #expect(!template.isPlainFallback)
        #expect(template.specialTokens == ChatFixture.shared.specialTokens["llama3.2"])
        try check("llama3.2", template)
    }

    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func qwen25TemplateMatchesTransformers() throws {
        let template = try ChatTemplate(folder: SharedTokenizers.qwen2Dir)
        #expect(template.specialTokens == ChatFixture.shared.specialTokens["qwen2.5"])
        try check("qwen2.5", template)
    }

    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func qwen3TemplateMatchesTransformers() throws {
        let source = try String(contentsOfFile: SharedTokenizers.qwen2Dir + "/Qwen-Qwen3-0.6B.jinja", encoding: .utf8)
        try check("qwen3", try ChatTemplate(source: source, specialTokens: try ChatTemplate(folder: SharedTokenizers.qwen2Dir).specialTokens))
    }

    /// Without date_string the Llama-3.2 template writes today's date through strftime_now.
    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func strftimeNowWritesToday() throws {
        let template = try ChatTemplate(folder: SharedTokenizers.llama3Dir)
        let text = try template.render(messages: [ChatMessage(role: "user", content: "Hi")], addGenerationPrompt: true)
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.dateFormat = "dd MMM yyyy"
        #expect(text.contains("Today Date: \(f.string(from: Date()))\n"), "\(text)")
    }

    /// `pf2lora tokenize --messages`: the template's text, then its ids with BOS written once (by the template).
    @Test(.enabled(if: SharedTokenizers.available, SharedTokenizers.skipMessage))
    func tokenizeMessagesCommand() throws {
        let dir = SharedTokenizers.llama3Dir
        let json = Data(#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]"#.utf8)
        let prompt = try CLITests.run(["tokenize", "--model", dir, "--messages", "--print-prompt"], stdin: json)
        let template = try ChatTemplate(folder: dir)
        let want = try template.render(messages: [ChatMessage(role: "system", content: "Be brief."), ChatMessage(role: "user", content: "Hi")],
                                       addGenerationPrompt: true)
        #expect(prompt.out == want, "\(prompt.err)")
        let ids = try CLITests.run(["tokenize", "--model", dir, "--messages"], stdin: json)
        let tok = SharedTokenizers.llama3!
        let expected = tok.encode(want, addSpecialTokens: false)
        #expect(expected.first == 128_000 && expected.filter { $0 == 128_000 }.count == 1)
        #expect(ids.out == "[" + expected.map(String.init).joined(separator: ", ") + "]\n")
        CLITests.expectOneErrorLine(try CLITests.run(["tokenize", "--model", dir, "--messages"], stdin: Data("[{\"content\": 1}]".utf8)), "role")
    }

    /// `pf2lora generate --messages` continues the rendered chat (plain format for a model without a
    /// template): the same text as --prompt with that rendering; exactly one of the two is accepted.
    @Test func generateWithMessages() throws {
        let json = #"[{"role": "user", "content": "The cat"}]"#
        let viaMessages = try CLITests.run(["generate", "--model", CLITests.tiny, "--messages", json, "--max-tokens", "8", "--temperature", "0", "--ignore-eos"])
        let viaPrompt = try CLITests.run(["generate", "--model", CLITests.tiny, "--prompt", "User: The cat\n\nAssistant:", "--max-tokens", "8", "--temperature", "0", "--ignore-eos"])
        #expect(viaMessages.code == 0, "\(viaMessages.err)")
        #expect(!viaMessages.out.isEmpty && viaMessages.out == viaPrompt.out)
        CLITests.expectOneErrorLine(try CLITests.run(["generate", "--model", CLITests.tiny, "--messages", json, "--prompt", "x"]), "either --prompt")
        CLITests.expectOneErrorLine(try CLITests.run(["generate", "--model", CLITests.tiny]), "either --prompt")
        CLITests.expectOneErrorLine(try CLITests.run(["generate", "--model", CLITests.tiny, "--messages", "[1]"]), "message")
    }

    @Test func plainFormatForModelsWithoutTemplate() throws {
        let template = try ChatTemplate(folder: TestPaths.gpt2Tokenizer.path)
        #expect(template.isPlainFallback)
        let text = try template.render(messages: [ChatMessage(role: "system", content: "Be brief."), ChatMessage(role: "user", content: " Hi \n"),
                                                  ChatMessage(role: "assistant", content: "Hello.")], addGenerationPrompt: true)
        #expect(text == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nAssistant:")
        #expect(try ChatTemplate.plain.render(messages: [ChatMessage(role: "user", content: "x")], addGenerationPrompt: false) == "User: x\n\n")
    }

    /// A template it cannot render: one error naming the construct.
    @Test func unsupportedConstructsNamed() throws {
        let cases: [(String, String)] = [
            ("{% include 'other.jinja' %}", "'{% include %}'"),
            ("{% extends 'base' %}", "'{% extends %}'"),
            ("{{ messages | groupby('role') }}", "filter 'groupby'"),
            ("{{ 1 is foo }}", "test 'foo'"),
            ("{% for x in messages recursive %}{% endfor %}", "recursive"),
            ("{{ '%s' % 'x' }}", "printf-style"),
        ]
        for (source, construct) in cases {
            do {
                let t = try ChatTemplate(source: source)
                _ = try t.render(messages: [ChatMessage(role: "user", content: "x")], addGenerationPrompt: false)
                Issue.record("\(source) rendered")
            } catch {
                #expect("\(error)".contains(construct), "\(source): \(error)")
            }
        }
        // syntax errors name the line
        do { _ = try ChatTemplate(source: "a\n{% if x %}\nb") ; Issue.record("unclosed if parsed") } catch {
            #expect("\(error)".contains("line") && "\(error)".contains("endif"), "\(error)")
        }
        do { _ = try ChatTemplate(source: "{{ x + }}"); Issue.record("bad expression parsed") } catch {
            #expect("\(error)".contains("syntax error at line 1"), "\(error)")
        }
    }

    /// OpenAI-style JSON messages: null fields are dropped (as transformers does), numbers keep int/float.
    @Test func messagesFromJSON() throws {
        let t = try ChatTemplate(source: "{% for m in messages %}{{ m.role }}:{{ m.content }}:{{ m.name is defined }}:{{ m.tool_calls | default([]) | tojson }};{% endfor %}")
        let text = try t.render(messagesJSON: #"[{"role": "user", "content": "a", "name": null}, {"role": "assistant", "content": null, "tool_calls": [{"x": 1.0, "y": 2}]}]"#,
                                addGenerationPrompt: false)
        #expect(text == #"user:a:False:[];assistant::False:[{"x": 1.0, "y": 2}];"#)
        #expect(throws: ChatTemplateError.self) { try t.render(messagesJSON: "[{\"content\": \"no role\"}]", addGenerationPrompt: false) }
        #expect(throws: ChatTemplateError.self) { try t.render(messages: [], addGenerationPrompt: false) }
    }

    /// The API layers' messages (HTTP chat, stdio `generate`, `generate --messages`). Before the fix
    /// they went to the template as given: a list of text parts (what the openai clients send for
    /// `content=[{"type": "text", ...}]`) rendered as its Python repr in the plain format (and as
    /// nothing in Qwen3's template), and a message without content or with a number was served.
    @Test func openAIMessagesJoinTextPartsAndRefuseWhatATextModelCannotRead() throws {
        let t = ChatTemplate.plain
        let parts = try t.render(messages: ChatMessage.openAI(json: #"[{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]"#),
                                 addGenerationPrompt: true)
        let plain = try t.render(messages: ChatMessage.openAI(json: #"[{"role": "user", "content": "Hi\nthere"}]"#), addGenerationPrompt: true)
        #expect(parts == plain && parts.contains("Hi\nthere") && !parts.contains("type"), "\(parts)")
        // An assistant turn with tool calls and no content is fine; other roles need content.
        _ = try ChatMessage.openAI(json: #"[{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": []}]"#)
        for (json, says) in [(#"[{"role": "user"}]"#, "messages[0] (role 'user') has no \"content\""),
                             (#"[{"role": "user", "content": "a"}, {"role": "user", "content": 5}]"#, "messages[1].content must be a string or a list of text parts"),
                             (#"[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]"#, "messages[0].content[0] is a 'image_url' part"),
                             (#"[{"role": "user", "content": [{"type": "text"}]}]"#, "without a \"text\" string"),
                             (#"[{"role": "", "content": "a"}]"#, "needs a \"role\" string"),
                             (#"[]"#, "non-empty JSON array"), (#"["hi"]"#, "messages[0] must be an object")] {
            do {
                _ = try ChatMessage.openAI(json: json)
                Issue.record("accepted \(json)")
            } catch {
                #expect("\(error)".contains(says), "\(json): \(error)")
            }
        }
    }

    @Test func pythonFormatting() {
        #expect(PythonFormat.floatRepr(1e16) == "1e+16")
        #expect(PythonFormat.floatRepr(1e15) == "1000000000000000.0")
        #expect(PythonFormat.floatRepr(0.0001) == "0.0001")
        #expect(PythonFormat.floatRepr(0.00001) == "1e-05")
        #expect(PythonFormat.floatRepr(-2.5e-7) == "-2.5e-07")
        #expect(PythonFormat.floatRepr(123.456) == "123.456")
        #expect(PythonFormat.floatRepr(Double.leastNonzeroMagnitude) == "5e-324")
        #expect(PythonFormat.floatRepr(1.7976931348623157e308) == "1.7976931348623157e+308")
        #expect(PythonFormat.stringRepr("it's") == "\"it's\"")
        #expect(PythonFormat.stringRepr("a\u{7f}\u{85}\u{a0}é\u{2028}\u{10ffff}") == "'a\\x7f\\x85\\xa0é\\u2028\\U0010ffff'")
    }
}
