import Foundation

/// One chat message: a role ("system", "user", "assistant", "tool") and its content, plus any other
/// fields a template reads (`tool_calls`, `reasoning_content`, `name` ...), in the order given.
public struct ChatMessage: @unchecked Sendable {
    /// All fields in order, "role" (and usually "content") among them.
    public private(set) var fields: JinjaObject

    public var role: String { if case .string(let r)? = fields["role"] { return r }; return "" }
    public var content: JinjaValue? { fields["content"] }

    public init(role: String, content: String, extra: [(String, JinjaValue)] = []) {
        fields = JinjaObject([("role", .string(role)), ("content", .string(content))] + extra)
    }

    /// A message from a JSON-like object, e.g. one element of an OpenAI `messages` array. Fields
    /// whose value is null are dropped, as transformers does.
    public init(_ value: JinjaValue) throws {
        guard case .object(let o) = value else { throw ChatTemplateError.badInput("a message must be an object, got \(value.typeName)") }
        guard case .string? = o["role"] else { throw ChatTemplateError.badInput("a message needs a \"role\" string") }
        fields = JinjaObject(o.pairs.filter { !$0.1.isNone })
    }

    /// The message as the template sees it, with reasoning also under "thinking" and
    /// "reasoning_content" as transformers aliases it.
    var value: JinjaValue {
        let reasoningKeys = ["reasoning_content", "thinking", "reasoning"]
        guard let reasoning = reasoningKeys.lazy.compactMap({ fields[$0] }).first(where: { !$0.isNone }) else { return .object(fields) }
        var aliased = JinjaObject()
        aliased["thinking"] = reasoning
        for (k, v) in fields.pairs { aliased[k] = v }
        aliased["reasoning_content"] = reasoning
        return .object(aliased)
    }
}

/// A model's chat template (the Jinja `chat_template` of tokenizer_config.json, or
/// chat_template.jinja beside it), rendered exactly as transformers' `apply_chat_template` renders it
/// with jinja2: `messages`, `add_generation_prompt`, `tools`, the special tokens (`bos_token`,
/// `eos_token` ...) and any extra variables (`enable_thinking`, `date_string` ...).
///
///     let template = try ChatTemplate(folder: "models/Llama-3.2-1B-Instruct")
///     let prompt = try template.render(messages: [ChatMessage(role: "user", content: "Hi")], addGenerationPrompt: true)
///     let ids = tokenizer.encode(prompt, addSpecialTokens: false)   // the template writes BOS itself
///
/// A folder without a template (GPT-2) gets `ChatTemplate.plain` (see `plainSource`).
public struct ChatTemplate: @unchecked Sendable {
    /// The Jinja source.
    public let source: String
    /// True when the folder had no chat template and the plain format is used.
    public let isPlainFallback: Bool
    /// Named special tokens passed to the template (bos_token, eos_token, unk_token, pad_token ...).
    public var specialTokens: [String: String]
    /// A template for calls with tools, when the folder names one ("tool_use").
    let toolUse: (String, [JinjaNode])?
    let nodes: [JinjaNode]

    /// The format used for models without a chat template: each message as "Role: content" (role
    /// capitalized) followed by a blank line, and "Assistant:" as the generation prompt.
    public static let plainSource = "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] | trim }}"
        + "{{ '\\n\\n' }}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"

    public static let plain: ChatTemplate = try! ChatTemplate(source: plainSource, plainFallback: true)

    /// Parses a template; a syntax error or an unsupported statement is reported here.
    public init(source: String, specialTokens: [String: String] = [:]) throws {
        try self.init(source: source, specialTokens: specialTokens, plainFallback: false)
    }

    private init(source: String, specialTokens: [String: String] = [:], plainFallback: Bool, toolUse: String? = nil) throws {
        self.source = source
        self.specialTokens = specialTokens
        self.isPlainFallback = plainFallback
        self.nodes = try JinjaParser.parse(source)
        self.toolUse = try toolUse.map { ($0, try JinjaParser.parse($0)) }
    }

    /// The template of a model or tokenizer folder: chat_template.jinja if present, else
    /// tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default",
    /// and "tool_use" for calls with tools), with the config's special tokens. A folder without
    /// either gets the plain format.
    public init(folder: String) throws {
        let dir = URL(fileURLWithPath: folder)
        let configPath = dir.appendingPathComponent("tokenizer_config.json").path
        var specials: [String: String] = [:]
        var source: String? = nil
        var toolUse: String? = nil
        if FileManager.default.fileExists(atPath: configPath) {
            let config: JSONValue
            do { config = try TokenizerFiles.readJSON(configPath) } catch {
                throw ChatTemplateError.noTemplate("\(error)")
            }
            for key in ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"] {
                if let t = TokenizerFiles.tokenString(config[key]) { specials[key] = t }
            }
            switch config["chat_template"] {
            case .string(let s)?:
                source = s
            case .array(let named)?:
                for entry in named {
                    guard let name = entry["name"]?.string, let template = entry["template"]?.string else {
                        throw ChatTemplateError.noTemplate("\(configPath): chat_template list entries need \"name\" and \"template\" strings")
                    }
                    if name == "default" { source = template }
                    if name == "tool_use" { toolUse = template }
                }
                if source == nil {
                    throw ChatTemplateError.noTemplate("\(configPath): chat_template has no template named \"default\" (it has \(named.count) named \(named.count == 1 ? "template" : "templates"))")
                }
            default:
                break
            }
        }
        let jinjaPath = dir.appendingPathComponent("chat_template.jinja").path
        if FileManager.default.fileExists(atPath: jinjaPath) {
            do { source = try String(contentsOfFile: jinjaPath, encoding: .utf8) } catch {
                throw ChatTemplateError.noTemplate("\(jinjaPath): cannot read (\(error.localizedDescription))")
            }
        }
        if let source {
            try self.init(source: source, specialTokens: specials, plainFallback: false, toolUse: toolUse)
        } else {
            try self.init(source: ChatTemplate.plainSource, specialTokens: specials, plainFallback: true)
        }
    }

    /// The prompt text for `messages`. `addGenerationPrompt` appends the start of an assistant turn.
    /// `tools` are JSON-schema tool descriptions for templates that use them; `context` adds or
    /// overrides template variables (e.g. "enable_thinking": false, "date_string": "26 Jul 2024").
    public func render(messages: [ChatMessage], addGenerationPrompt: Bool, tools: [JinjaValue]? = nil,
                       context: [String: JinjaValue] = [:]) throws -> String {
        guard !messages.isEmpty else { throw ChatTemplateError.badInput("cannot apply a chat template to an empty conversation") }
        var variables: [String: JinjaValue] = [:]
        for (k, v) in specialTokens { variables[k] = .string(v) }
        variables["messages"] = .array(messages.map { $0.value })
        variables["tools"] = tools.map { JinjaValue.array($0) } ?? JinjaValue.none
        variables["documents"] = JinjaValue.none
        variables["add_generation_prompt"] = .bool(addGenerationPrompt)
        for (k, v) in context { variables[k] = v }
        let program = tools != nil ? (toolUse?.1 ?? nodes) : nodes
        return try JinjaInterpreter(context: variables).render(program)
    }

    /// `render` with messages given as a JSON array (OpenAI's `messages`), e.g. from a request body.
    public func render(messagesJSON: String, addGenerationPrompt: Bool, tools: [JinjaValue]? = nil,
                       context: [String: JinjaValue] = [:]) throws -> String {
        guard case .array(let items) = try JinjaValue.parseJSON(messagesJSON) else {
            throw ChatTemplateError.badInput("messages must be a JSON array of objects")
        }
        return try render(messages: try items.map { try ChatMessage($0) }, addGenerationPrompt: addGenerationPrompt,
                          tools: tools, context: context)
    }
}

extension ChatMessage {
    /// OpenAI-style `messages` (a JSON array) checked and made ready for a text model's template, as
    /// the API layers (HTTP, the stdio `generate`, `pf2lora generate --messages`) take them:
    /// - `content` a string; or a list of text parts (`{"type": "text", "text": ...}`, as the openai
    ///   clients send it), joined with "\n" as vLLM does for templates that read content as a string
    ///   (Qwen3's template rendered a list as nothing, the plain format as its Python repr);
    /// - no or null `content` only on an assistant message (one that carries `tool_calls`);
    /// - any other content (a number, an object, an image part) is refused naming the message.
    /// Roles are not restricted: templates define them (Llama-3.1's `ipython`, `tool`, `developer` ...).
    /// `ChatTemplate.render(messagesJSON:)` stays transformers' `apply_chat_template` as it is.
    public static func openAI(json: String) throws -> [ChatMessage] {
        guard case .array(let items) = try JinjaValue.parseJSON(json), !items.isEmpty else {
            throw ChatTemplateError.badInput("messages must be a non-empty JSON array of message objects ({\"role\": ..., \"content\": ...})")
        }
        return try items.enumerated().map { i, item in
            guard case .object(var o) = item else { throw ChatTemplateError.badInput("messages[\(i)] must be an object, got \(item.typeName)") }
            guard case .string(let role)? = o["role"], !role.isEmpty else {
                throw ChatTemplateError.badInput("messages[\(i)] needs a \"role\" string (system, user, assistant, tool ...)")
            }
            switch o["content"] {
            case .string?: break
            case .array(let parts)?:
                var texts: [String] = []
                for (j, part) in parts.enumerated() {
                    guard case .object(let p) = part, case .string(let type)? = p["type"] else {
                        throw ChatTemplateError.badInput("messages[\(i)].content[\(j)] must be a part object with a \"type\"")
                    }
                    guard type == "text", case .string(let t)? = p["text"] else {
                        throw ChatTemplateError.badInput(type == "text"
                            ? "messages[\(i)].content[\(j)] is a text part without a \"text\" string"
                            : "messages[\(i)].content[\(j)] is a '\(type)' part; this model reads text only (parts of type \"text\")")
                    }
                    texts.append(t)
                }
                o["content"] = .string(texts.joined(separator: "\n"))
            case nil, .none?:
                guard role == "assistant" else {
                    throw ChatTemplateError.badInput("messages[\(i)] (role '\(role)') has no \"content\"; give its text as a string")
                }
            case let other?:
                throw ChatTemplateError.badInput("messages[\(i)].content must be a string or a list of text parts, got \(other.typeName)")
            }
            return try ChatMessage(.object(o))
        }
    }
}
