"""`difflab ui`: the handlers on the zoo models, and the app end to end in headless Chromium
(Debian's chromium driven by selenium; nothing downloads a browser): generate, paint a mask and
edit, compare samplers, and bad input shown in the page while the app keeps serving."""

import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from difflab import ui
from difflab.data import load_dataset
from difflab.pipeline import Pipeline

KNOBS = [k.default for _, k in ui._knob_order()]


def _digit(size=16) -> np.ndarray:
    x = load_dataset("digits", "test").images[0, 0]
    return ((x + 1) * 127.5).clamp(0, 255).byte().numpy()


def test_sample_matches_the_pipeline_and_names_bad_input():
    image, status = ui.sample_images("digits-unet-s", "", "euler", 3, 1.0, 5, "", 4)
    assert status == "4 images, euler, 3 steps, guidance 1, seed 5"
    want = Pipeline.from_pretrained(ui.zoo_path("digits-unet-s"))(4, sampler="euler", steps=3, seed=5)
    assert np.array_equal(np.asarray(image), np.asarray(ui._show(want)))  # the page shows the library's samples
    assert ui.sample_images("digits-unet-s", "no/such/run", "euler", 3, 1.0, 0, "", 4) == (
        None,
        "**Error:** run folder 'no/such/run' not found (it needs config.json and model.safetensors)",
    )
    assert ui.sample_images("fmnist-unet-s", "", "euler", 2, 2.0, 0, "Sneaker", 1)[1].endswith("class 7")
    assert "names no class of this run" in ui.sample_images("fmnist-unet-s", "", "euler", 2, 1.0, 0, "cat", 1)[1]
    assert "images must be an integer in [1, 64]" in ui.sample_images("digits-unet-s", "", "euler", 2, 1, 0, "", 0)[1]


def test_edit_keeps_the_unpainted_region_and_names_bad_input():
    bg = _digit()
    layer = np.zeros((*bg.shape, 4), np.uint8)
    layer[: bg.shape[0] // 2, :, 3] = 255  # paint the top half: the region to change
    strip, status = ui.edit_image(
        "digits-unet-s", "", "repaint", {"background": bg, "layers": [layer]}, None, "", "", 4, 0, *KNOBS
    )
    assert strip is not None and status.endswith("region to change: 50% of the image")
    pipe = Pipeline.from_pretrained(ui.zoo_path("digits-unet-s"))
    from difflab.edit import edit

    image = ui._image_tensor(bg, 1, 16)
    keep = torch.ones(1, 1, 16, 16)
    keep[..., :8, :] = 0
    out = edit(pipe, "repaint", image, mask=keep, steps=4, seed=0).output
    assert torch.equal(out[..., 8:, :], image[..., 8:, :].clamp(-1, 1))  # RePaint keeps the unpainted half exactly
    no_image = ui.edit_image("digits-unet-s", "", "repaint", None, None, "", "", 4, 0, *KNOBS)
    assert no_image == (None, "**Error:** upload an image to edit first")
    other_size = ui.edit_image(
        "digits-unet-s",
        "",
        "repaint",
        {"background": bg, "layers": []},
        np.zeros((5, 7), np.uint8),
        "",
        "",
        4,
        0,
        *KNOBS,
    )
    assert other_size[1] == "**Error:** the mask is 7x5, the image 16x16: a mask must have the image's size"
    no_mask = ui.edit_image(
        "digits-unet-s", "", "repaint", {"background": bg, "layers": []}, None, "", "", 4, 0, *KNOBS
    )
    assert "repaint needs a mask" in no_mask[1]


def test_compare_puts_each_sampler_on_the_same_noise():
    image, status = ui.compare_samplers("digits-unet-s", "", ["euler", "heun"], 3, 1.0, 0, "", 2)
    assert image is not None and status == "2 samplers, 3 steps, seed 0"
    assert ui.compare_samplers("digits-unet-s", "", [], 3, 1.0, 0, "", 2) == (
        None,
        "**Error:** choose at least one sampler",
    )


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    app = ui.build_app()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,2200",
    ):
        opts.add_argument(arg)
    opts.binary_location = "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.get(f"http://127.0.0.1:{port}/")
    try:
        yield driver, tmp_path_factory.mktemp("ui")
    finally:
        driver.quit()
        app.close()


def _wait(fn, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = fn()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out waiting in the page")


def _status(driver, elem_id, previous=""):
    """The status line once the request is done (while it runs, Gradio's progress overlay adds lines
    such as "processing | 0.1s" or "0/1 steps | 0.4s") and has changed."""
    from selenium.webdriver.common.by import By

    def done():
        text = driver.find_element(By.ID, elem_id).text.strip()
        if not text or len(text.splitlines()) != 1 or text == previous:
            return None
        return text

    return _wait(done)


def _image_src(driver, elem_id):
    from selenium.webdriver.common.by import By

    return _wait(
        lambda: [
            i.get_attribute("src")
            for i in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
            if i.get_attribute("src")
        ]
    )[0]


def _tab(driver, name):
    from selenium.webdriver.common.by import By

    _wait(lambda: [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name])[
        0
    ].click()


@pytest.mark.needs_browser
def test_generate_paint_edit_compare_and_bad_input_in_the_page(browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, tmp = browser
    _wait(lambda: driver.find_elements(By.ID, "sample-button"))
    # a bad run folder: a message in the page, then the app still serves a good request
    box = _wait(
        lambda: driver.find_elements(
            By.CSS_SELECTOR, "textarea[placeholder='runs/my_run'], input[placeholder='runs/my_run']"
        )
    )[0]
    box.send_keys("no/such/run")
    driver.find_element(By.ID, "sample-button").click()
    bad = _status(driver, "sample-status")
    assert bad.startswith("Error: run folder 'no/such/run' not found")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)  # typed away (Gradio listens to input events; clear() sends none)
    driver.find_element(By.ID, "sample-button").click()
    assert _status(driver, "sample-status", bad).startswith("8 images, unipc_auto, 10 steps")
    assert _image_src(driver, "sample-output")

    _tab(driver, "Edit")
    driver.find_element(By.ID, "edit-button").click()
    assert _status(driver, "edit-status") == "Error: upload an image to edit first"
    Image.fromarray(_digit()).resize((64, 64), Image.NEAREST).save(tmp / "digit.png")
    editor = driver.find_element(By.ID, "edit-editor")
    editor.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(tmp / "digit.png"))
    _wait(lambda: editor.find_elements(By.CSS_SELECTOR, "button[aria-label=Brush]"))[0].click()
    canvas = editor.find_elements(By.CSS_SELECTOR, "canvas")[-1]
    stroke = ActionChains(driver).move_to_element_with_offset(canvas, -60, -20).click_and_hold()
    for dx in range(-60, 61, 10):
        stroke.move_to_element_with_offset(canvas, dx, -20)
    stroke.release().perform()
    time.sleep(1)
    driver.find_element(By.ID, "edit-button").click()
    done = _status(driver, "edit-status", "Error: upload an image to edit first")
    assert done.startswith("RePaint (Lugmayr et al. 2022") and "input | mask: white = keep | output" in done
    assert 0 < int(done.rsplit("region to change: ", 1)[1].split("%")[0]) < 100  # the painted stroke became the mask
    assert _image_src(driver, "edit-output")
    # a mask file of another size: a message, not a traceback
    Image.new("L", (10, 10), 255).save(tmp / "small_mask.png")
    driver.find_element(By.CSS_SELECTOR, "#edit-mask input[type=file]").send_keys(str(tmp / "small_mask.png"))
    time.sleep(1)
    driver.find_element(By.ID, "edit-button").click()
    assert _status(driver, "edit-status", done) == (
        "Error: the mask is 10x10, the image 64x64: a mask must have the image's size"
    )

    _tab(driver, "Compare samplers")
    driver.find_element(By.ID, "compare-button").click()
    assert _status(driver, "compare-status").startswith("3 samplers, 6 steps, seed 0")
    assert _image_src(driver, "compare-output")


def test_every_knob_gets_a_widget_of_its_type():
    """Free-text knobs (Imagic's eta sweep, UniTune's token, Asyrp's model prompt) get a text box, not a
    number field; the values the page sends back reach the method with their types."""
    gr = pytest.importorskip("gradio")
    for _, knob in ui._knob_order():
        widget = ui._knob_widget(gr, knob)
        if knob.type is str and knob.choices is None:
            assert isinstance(widget, gr.Textbox), knob.name
    values = ["0,1" if (m, k.name) == ("imagic", "sweep") else None for m, k in ui._knob_order()]
    assert ui._knob_kwargs("imagic", values) == {"sweep": "0,1"}
